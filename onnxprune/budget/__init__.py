"""Budgets: how much a pruning may cost and what it buys (latency cost model)."""

from .latency import (DEFAULT_CACHE, LatencyModel, LatencyTable, LatencyTarget, LayerSpec, LayerWidths, cache_key,
                      context_shares, default_cache_path, int8_form, layer_model, layer_specs, layer_widths,
                      measure_layer, measure_whole, runs_float_in_int8)

__all__ = ["DEFAULT_CACHE", "LatencyModel", "LatencyTable", "LatencyTarget", "LayerSpec", "LayerWidths", "cache_key",
           "context_shares", "default_cache_path", "int8_form", "layer_model", "layer_specs", "layer_widths",
           "measure_layer", "measure_whole", "runs_float_in_int8"]
