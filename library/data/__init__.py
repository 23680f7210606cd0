"""Training data: layouts (dataset TOML, folders), captions, buckets, augmentation, caches and the check.

    dataset_config.py  which folders train with which settings (sd-scripts dataset TOML, folder convention)
    images.py          image headers, pixels of one example (resize, crop, flip, alpha mask)
    captions.py        caption files and the seeded caption transforms
    buckets.py         aspect-ratio buckets and the batch sampler
    augment.py         flip / color / random crop, and the per-example random source
    check.py           the dataset check (python -m library.data.check --config x.toml)
    plan.py            the data plan of a run: layout + check + buckets + epoch entries
    training_set.py    the torch Dataset and collate
    cache.py           latent and text-encoder caches, in memory or on disk (python -m library.data.cache)
    __main__.py        the commands: python -m library.data check|cache --config x.toml
"""


class DatasetError(Exception):
    """A problem with the training images or captions; names the files and why."""
