"""Captioning data: one layout for every source, unreadable images dropped, image features cached.

A Hub data set (a column may hold Karpathy's split), `embedded`, JSONL/CSV files or an imagefolder
becomes a `DatasetDict` of its splits with `image_id` (str), `image` (datasets `Image()`) and
`captions` (list of str). Every source goes through the same guards (docs/reliability.md):
`resolve_inside` for image paths, `caption_list` for captions, `require_images` for emptied splits,
and `clipqwen.images.load_image` for every decode, the collator's included. `embedded` is the generated
offline data set; `prepare` picks the steps a training run takes.
"""
