"""Data: readers for the official formats (uint8 N x C x H x W, labels optional) and batched on-device views."""

from selfsup.data.datasets import (
           DataError,
           ImageDataset,
           dataset_stats,
           describe_data,
           from_arrays,
           load_dataset,
)
from selfsup.data.types import DataInfo
from selfsup.data.views import (
           MultiView,
           ViewMaker,
           build_view_maker,
           byol_views,
           multicrop_views,
           simclr_views,
)

__all__ = ["DataError", "DataInfo", "ImageDataset", "MultiView", "ViewMaker", "build_view_maker", "byol_views", "dataset_stats", "describe_data",
           "from_arrays", "load_dataset", "multicrop_views", "simclr_views"]
