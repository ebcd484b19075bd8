"""The benchmark suites, run by ``admmprune bench --suite param|energy|obs|all``.

* :mod:`admmprune.bench.param`: parameter budgets, ADMM against magnitude
  pruning at equal epochs (LeNet-300-100, LeNet-5);
* :mod:`admmprune.bench.energy`: LeNet-5 under energy budgets, and the
  knapsack projection itself;
* :mod:`admmprune.bench.obs`: one-shot OBS pruning, the fast solver's speed,
  ADMM's OBS hard prune;

with :mod:`admmprune.bench.tables`, the results header, files and target rows
they share. Each suite writes ``results.json`` and ``results.md`` into its
``--out``. The core library never imports this package, and importing it
imports none of the suites.
"""
