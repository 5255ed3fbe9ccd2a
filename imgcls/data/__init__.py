"""Data: sources -> unusable files left out or reported -> seeded split -> decode-once uint8 cache
-> batches on the training device. DataConfig and the registries of sources and splits import no
torch; the rest loads it on first use."""

from imgcls.lazy import lazy_exports

_EXPORTS = {
    "Augment": "imgcls.data.augment",
    **dict.fromkeys(("IMAGENET_MEAN", "IMAGENET_STD", "Batches", "channel_stats"),
                    "imgcls.data.batches"),
    **dict.fromkeys(("Decoded", "Progress", "decode", "load_images", "to_array"),
                    "imgcls.data.cache"),
    "DataConfig": "imgcls.data.config",
    **dict.fromkeys(("PreparedData", "prepare_data"), "imgcls.data.prepare"),
    **dict.fromkeys(("GIVEN_SPLITS", "IMAGE_EXTENSIONS", "SOURCES", "Catalog", "CsvSource",
                     "DigitsSource", "FolderSource", "NpzSource", "Source", "check_classes",
                     "listing", "open_source", "scale_to_uint8"), "imgcls.data.sources"),
    **dict.fromkeys(("SPLIT_NAMES", "SPLITS", "Split", "make_split", "stratified_split"),
                    "imgcls.data.split"),
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
