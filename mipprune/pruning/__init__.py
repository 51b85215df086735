"""Pruning: prunable channel groups from torch.fx (:mod:`.graph`), activation statistics
(:mod:`.bridge`), the criteria baselines (:mod:`.criteria`), network-wide budgets (:mod:`.budget`),
TECU (:mod:`.tecu`), physical removal with reconstruction (:mod:`.surgery`) and the
:class:`~mipprune.pruning.selector.ChannelSelector` that ties them together (:mod:`.selector`)."""
