"""The algorithmic core (eqs. 1-12 and 26-29 of the paper): gating, fusion, SMO, cost model, scores and
statistics. numpy, scipy and threadpoolctl only (torch imported lazily by the gating network's training);
it imports nothing above ``infra``."""
