"""tl_dist: fine-tune VGG16 (or another torchvision network) on Caltech-101 with Accelerate.

`tl_dist.load_model(path)` loads a fine-tuned model for use from Python (see tl_dist.predict.LoadedModel).
"""

__all__ = ["LoadedModel", "load_model"]


def __getattr__(name: str):
    # Imported on first use, not with the package: `python -m tl_dist.predict` would otherwise import
    # tl_dist.predict twice (runpy warns), and `tl_dist.config` users would pay for torchvision.
    if name in __all__:
        from tl_dist import predict

        return getattr(predict, name)
    raise AttributeError(f"module 'tl_dist' has no attribute {name!r}")
