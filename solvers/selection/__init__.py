"""Channel selection on activation statistics: :class:`~solvers.selection.problem.SelectionProblem`
(Gram statistics, error, refit) and :func:`~solvers.selection.select.select_channels`, which
dispatches to LASSO (:mod:`.lasso`), exact subset selection with a proven gap (:mod:`.exact`),
greedy/backward (:mod:`.greedy`) and the magnitude/random baselines (:mod:`.baselines`)."""
