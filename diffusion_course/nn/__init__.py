"""The networks: the time embedding, the blocks and the U-Net of lesson 04_unet, and the transformer
blocks, condition encoders and attention-map recording of lesson 07_cross_attention, and the time-aware
encoder of StableSR (lesson 09_stablesr).

``from diffusion_course.nn import UNet, UNetConfig``; ``from diffusion_course.nn import ConditionalDenoiser,
ConditionerConfig, build_conditioner``; ``from diffusion_course.nn import EncoderUNetModelWT,
TimeAwareEncoderConfig``.

Imports inside the package only point down this list, never in a circle:
layers <- attention <- transformer <- blocks <- unet <- conditioning; attention <- attention_maps;
encoder imports layers, attention, blocks and embedding; embedding and tokenizer stand alone.
"""
from .attention import AttentionBlock, MultiHeadAttention, attention_heads, check_mask
from .attention_maps import AttentionRecord, record_cross_attention
from .blocks import DownBlock, Downsample, ResidualBlock, UpBlock, Upsample
from .conditioning import (ClassEmbedder, ConditionalDenoiser, ConditionEncoder, ConditionerConfig, LayoutEncoder,
                           TextEncoder, build_conditioner)
from .embedding import TimeEmbedding, timestep_embedding
from .encoder import (EncoderUNetModelWT, TimeAwareEncoderConfig, TimestepEmbedSequential, capture_scales,
                      check_fea_tran)
from .layers import group_norm, zero_module
from .tokenizer import Tokenizer, split_words
from .transformer import GEGLU, BasicTransformerBlock, FeedForward, SpatialTransformer
from .unet import UNet, UNetConfig

__all__ = ["AttentionBlock", "MultiHeadAttention", "attention_heads", "check_mask", "AttentionRecord",
           "record_cross_attention", "DownBlock", "Downsample", "ResidualBlock", "UpBlock", "Upsample",
           "ClassEmbedder", "ConditionalDenoiser", "ConditionEncoder", "ConditionerConfig", "LayoutEncoder",
           "TextEncoder", "build_conditioner", "TimeEmbedding", "timestep_embedding", "group_norm", "zero_module",
           "Tokenizer", "split_words", "GEGLU", "BasicTransformerBlock", "FeedForward", "SpatialTransformer",
           "UNet", "UNetConfig", "EncoderUNetModelWT", "TimeAwareEncoderConfig", "TimestepEmbedSequential",
           "capture_scales", "check_fea_tran"]
