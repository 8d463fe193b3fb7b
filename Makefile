# Thin aliases of run.sh (which installs what is missing first).
PROFILE ?= default

.PHONY: setup reproduce test smoke lab figures
setup:
	bash run.sh setup
reproduce:
	bash run.sh reproduce --profile $(PROFILE)
smoke:
	bash run.sh reproduce --profile smoke
test:
	bash run.sh test
lab:
	bash run.sh lab
figures:
	bash run.sh moe2 figures
