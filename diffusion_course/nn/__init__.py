"""The networks: the time embedding, the blocks and the U-Net of lesson 04_unet, and the transformer
blocks, condition encoders and attention-map recording of lesson 07_cross_attention.

``from diffusion_course.nn import UNet, UNetConfig``; ``from diffusion_course.nn import ConditionalDenoiser,
ConditionerConfig, build_conditioner``.

Imports inside the package only point down this list, never in a circle:
layers <- attention <- transformer <- blocks <- unet <- conditioning; attention <- attention_maps;
embedding and tokenizer stand alone.
"""
from .attention import AttentionBlock, MultiHeadAttention, attention_heads, check_mask
from .attention_maps import AttentionRecord, record_cross_attention
from .blocks import DownBlock, Downsample, ResidualBlock, UpBlock, Upsample
from .conditioning import (ClassEmbedder, ConditionalDenoiser, ConditionEncoder, ConditionerConfig, LayoutEncoder,
                           TextEncoder, build_conditioner)
from .embedding import TimeEmbedding, timestep_embedding
from .layers import group_norm, zero_module
from .tokenizer import Tokenizer, split_words
from .transformer import GEGLU, BasicTransformerBlock, FeedForward, SpatialTransformer
from .unet import UNet, UNetConfig

__all__ = ["AttentionBlock", "MultiHeadAttention", "attention_heads", "check_mask", "AttentionRecord",
           "record_cross_attention", "DownBlock", "Downsample", "ResidualBlock", "UpBlock", "Upsample",
           "ClassEmbedder", "ConditionalDenoiser", "ConditionEncoder", "ConditionerConfig", "LayoutEncoder",
           "TextEncoder", "build_conditioner", "TimeEmbedding", "timestep_embedding", "group_norm", "zero_module",
           "Tokenizer", "split_words", "GEGLU", "BasicTransformerBlock", "FeedForward", "SpatialTransformer",
           "UNet", "UNetConfig"]
