"""``ListGlobalAveragePooling``: mmpretrain's neck for backbones that return a list of maps."""
try:  # mmpretrain is optional: it runs the upstream (classification) stages
    from mmpretrain.models import GlobalAveragePooling
    from mmpretrain.registry import MODELS as MMPRETRAIN_MODELS
except ImportError:
    ListGlobalAveragePooling = None
else:
    @MMPRETRAIN_MODELS.register_module()
    class ListGlobalAveragePooling(GlobalAveragePooling):
        """mmpretrain's ``GlobalAveragePooling`` for backbones that return a list of maps
        (mmseg's and mmdet's Swin), so their checkpoints need no conversion downstream."""

        def forward(self, inputs):
            return super().forward(tuple(inputs) if isinstance(inputs, list) else inputs)
