# RMoE-BEiT-L + UperNet on ADE20K: mmseg's BEiT-L recipe with every other layer (the odd ones,
# 12 of 24) an RMoE layer of 8 experts, each the pretrained FFN (core) plus a residual.
# RMoEBackbone takes BEiT's own arguments (the upstream ones are kept) and the BEiT checkpoint
# loads through BEiT's own init_weights: convert the official one with mmseg's
# tools/model_converters/beit2mmseg.py into pretrain/beit_large_patch16_224_pt22k_ft22k.pth.
_base_ = ['mmseg::beit/beit-large_upernet_8xb1-amp-160k_ade20k-640x640.py']
custom_imports = dict(imports=['rmoe_plugin'], allow_failed_imports=False)
model = dict(
    type='RMoEEncoderDecoder',
    backbone=dict(
        type='RMoEBackbone',
        backbone_type='BEiT',
        moe_cfg=dict(num_experts=8, top_k=1, capacity_factor=1.25, eval_capacity_factor=None,
                     router_noise_std=0.125, importance_loss_weight=0.01)))
# The layer-wise learning-rate decay of the upstream recipe covers the MoE layers by their
# layer index (backbone.layers.{i}.ffn.moe...); its constructor takes no custom_keys, so the
# routers and residuals decay as the other weight matrices do.
