"""Models by name: a catalog of architectures (what each takes and costs, importable without
torch), a builder per architecture adapted to classes, channels and dropout, pretrained ImageNet
weights read from local files (or fetched once into torch hub's cache), and an optionally
frozen backbone."""

from imgcls.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("MODELS", "Architecture", "Reference", "REFERENCE_SIZE", "check_image_size",
                     "smallest_image_size", "weights_file", "find_weights", "can_download"),
                    "imgcls.models.catalog"),
    "fetch_weights": "imgcls.models.download",
    **dict.fromkeys(("BUILDERS", "Builder", "builds", "classifier_head", "freeze_backbone",
                     "head_module", "with_in_channels"), "imgcls.models.builders"),
    "build_model": "imgcls.models.build",
    "SimpleCNN": "imgcls.models.simplecnn",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
