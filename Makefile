# Thin aliases of run.sh (which installs what is missing first).
PROFILE ?= default

.PHONY: setup reproduce test test-fast fuzz smoke lab figures
setup:
	bash run.sh setup
reproduce:
	bash run.sh reproduce --profile $(PROFILE)
smoke:
	bash run.sh reproduce --profile smoke
test:
	bash run.sh test
# the core and the loaders, without models, servers or notebooks (under 2 minutes on 2 cores)
test-fast:
	bash run.sh test -m "not slow"
# the property tests (Hypothesis) with fresh randomness and FUZZ_FACTOR times the examples, to hunt for bugs;
# `make test` draws the same examples every run (the "ci" profile in tests/conftest.py)
FUZZ_FACTOR ?= 10
fuzz:
	HYPOTHESIS_PROFILE=fuzz MOE2_FUZZ_FACTOR=$(FUZZ_FACTOR) bash run.sh test -m hypothesis
lab:
	bash run.sh lab
figures:
	bash run.sh moe2 figures
