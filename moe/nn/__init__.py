"""Mixture-of-experts layers, routers and models (ViT / V-MoE).

Modules: `blocks` (MLP, position embedding), `attention` (self-attention
with selectable edge sparsity), `transformer` (encoder blocks
with dense or MoE MLPs), `dispatch` (routing tables; einsum, index, soft and
dropless ragged dispatchers), `router_losses` (auxiliary losses and their
weighted sum), `routers`, `moe_layer` (experts and the MoE MLP
block), `placement` (sharding constraints on the context mesh), `vit`,
`decoder` (causal decoder-only LM on tokens), `models` (build a model from
`config.model`).
"""
from moe.nn.attention import SelfAttention
from moe.nn.blocks import MlpBlock
from moe.nn.blocks import PositionEmbedding
from moe.nn.decoder import Decoder
from moe.nn.dispatch import EinsumDispatcher
from moe.nn.dispatch import IndexDispatcher
from moe.nn.dispatch import RaggedDispatcher
from moe.nn.dispatch import Routing
from moe.nn.dispatch import SoftDispatcher
from moe.nn.models import build_model
from moe.nn.moe_layer import Experts
from moe.nn.moe_layer import MoeMlpBlock
from moe.nn.routers import compute_capacity
from moe.nn.routers import create_router
from moe.nn.routers import get_router
from moe.nn.routers import NoisyTopExpertsPerItem
from moe.nn.routers import ROUTERS
from moe.nn.routers import SoftMoE
from moe.nn.routers import SparseTopItemsPerExpert
from moe.nn.routers import SparseTopK
from moe.nn.routers import TopItemsPerExpert
from moe.nn.transformer import Encoder
from moe.nn.transformer import EncoderBlock
from moe.nn.transformer import moe_layer_indices
from moe.nn.vit import create_model
from moe.nn.vit import VisionTransformer

__all__ = [
    "build_model",
    "compute_capacity",
    "create_model",
    "create_router",
    "Decoder",
    "EinsumDispatcher",
    "Encoder",
    "EncoderBlock",
    "Experts",
    "get_router",
    "IndexDispatcher",
    "MlpBlock",
    "moe_layer_indices",
    "MoeMlpBlock",
    "NoisyTopExpertsPerItem",
    "PositionEmbedding",
    "RaggedDispatcher",
    "ROUTERS",
    "Routing",
    "SelfAttention",
    "SoftDispatcher",
    "SoftMoE",
    "SparseTopItemsPerExpert",
    "SparseTopK",
    "TopItemsPerExpert",
    "VisionTransformer",
]
