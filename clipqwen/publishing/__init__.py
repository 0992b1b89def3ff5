"""What a finished run publishes: the exported folder (model, processor, predictions), its model card and figures."""
