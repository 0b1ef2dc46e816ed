"""The networks of lesson 04_unet: the time embedding, the blocks and the U-Net.

``from diffusion_course.nn import UNet, UNetConfig``.
"""
from .attention import AttentionBlock, MultiHeadAttention
from .blocks import DownBlock, Downsample, ResidualBlock, UpBlock, Upsample, group_norm, zero_module
from .embedding import TimeEmbedding, timestep_embedding
from .unet import UNet, UNetConfig

__all__ = ["AttentionBlock", "MultiHeadAttention", "DownBlock", "Downsample", "ResidualBlock", "UpBlock",
           "Upsample", "group_norm", "zero_module", "TimeEmbedding", "timestep_embedding", "UNet", "UNetConfig"]
