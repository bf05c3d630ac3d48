# relayd — the two commands a fresh machine needs are `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
EXTRAS ?= dev
PORT_BASE ?= 2500

.PHONY: run test lint bench install uninstall clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

## run: relayd in the foreground on 127.0.0.1:2525/2587/2465 (PORT_BASE=2500), state under ./var
run: $(STAMP)
	PORT_BASE=$(PORT_BASE) $(BIN)/python -m relayd.dev var
	$(BIN)/relayd --config var/relayd.toml

## test: the whole test suite
test: $(STAMP)
	$(BIN)/python -m pytest -q

## lint: ruff and mypy
lint: $(STAMP)
	$(BIN)/ruff check relayd tests
	$(BIN)/mypy

## bench: relayd side by side with Postfix (installs Debian's postfix if missing)
bench: $(STAMP)
	PYTHONPATH=tests $(BIN)/python -m bench $(BENCH_ARGS)

## install / uninstall: as a systemd service (DESTDIR= and PREFIX= honoured)
install:
	sh systemd/install.sh

uninstall:
	sh systemd/uninstall.sh

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
