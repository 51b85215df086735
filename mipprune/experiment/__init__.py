"""The headline experiment, one module per role: configuration (:mod:`.config`), the dense and
pruned networks (:mod:`.networks`), the verification queries and their resumable store
(:mod:`.queries`), their executors (:mod:`.executors`: local pool or Ray), the analysis
(:mod:`.aggregation`), the orchestration (:mod:`.run`) and the reports (:mod:`.report`)."""
