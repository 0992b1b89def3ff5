"""Captioning data: load any source into one layout, drop unreadable images up front, cache CLIP features.

Every source becomes a `DatasetDict` with the splits it has (`train`, `validation`, `test`) and three columns:
`image_id` (str), `image` (datasets `Image()`), `captions` (list of str, all references of that image).

Sources:
- a Hub data set (`dataset_name`), e.g. Flickr30K's parquet conversion; a column holding the Karpathy split
  (`train` / `val` / `test`) partitions it (datasets >= 4 cannot run the old loading scripts);
- `embedded`: the generated shapes data set that ships with the project (clipqwen.embedded);
- JSONL or CSV annotation files with an image-path column (paths relative to the file, kept inside it);
  rows with one caption each are grouped per image;
- imagefolder directories with a `metadata.jsonl` (`file_name` + captions).

Whatever the source, the same guards apply (docs/reliability.md): every image reference goes through one resolver
(`resolve_inside`: inside the source's root, symlinks resolved), captions must be strings (`caption_list`), a split
left without images is an error (`require_images`), and images are decoded only by `clipqwen.images.load_image`
(`with_checked_images`), also when the collator reads them during training.
"""
