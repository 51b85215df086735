"""Pruning: prunable channel groups from torch.fx (:mod:`.graph`), activation statistics
(:mod:`.bridge`), the criteria baselines (:mod:`.criteria`), network-wide budgets (:mod:`.budget`),
TECU (:mod:`.tecu`), physical removal with reconstruction (:mod:`.surgery`) and the
:class:`~mipprune.pruning.selector.ChannelSelector` that ties them together (:mod:`.selector`).
Channel groups through residual adds, concats, gates, depthwise/grouped convs and shuffles:
:mod:`.channel_graph` (analysis), :mod:`.joint` (one selection problem per group),
:mod:`.group_surgery`, :mod:`.group_budget` (exact FLOPs/params), :mod:`.group_pruning` (driver) and
:mod:`.group_selector` (the selector's group mode)."""
