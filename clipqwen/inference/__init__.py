"""Captioning with a trained model: safe loading, the shared captioning steps, and the `clipqwen-caption` CLI
(the Gradio demo, app.py at the repository root, uses the same steps)."""
