# drover — the targets an operator or a developer needs. `make` lists them.
SHELL := /bin/bash
GO ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)
BIN := bin
STATICCHECK ?= $(shell command -v staticcheck || echo $(HOME)/go/bin/staticcheck)
export PATH := /usr/local/go/bin:$(HOME)/go/bin:$(PATH)

.DEFAULT_GOAL := help
TESTBIN := $(BIN)/test
.PHONY: help deps build build-test install test unit e2e lint bench demo fuzz clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z0-9-]+:.*## / {printf "  %-8s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

deps: ## install what the tests and the lab need (Debian packages, zfs-fuse, staticcheck)
	./.ci/install-deps.sh

build: ## build droverd and droverctl into bin/
	@mkdir -p $(BIN)
	$(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/ ./cmd/droverd ./cmd/droverctl
	CGO_ENABLED=0 $(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/ ./cmd/drover-hold

build-test: ## build droverd and droverctl with test crash points (-tags crashpoints) into bin/test/, for e2e and bench
	@mkdir -p $(TESTBIN)
	$(GO) build -tags crashpoints -ldflags '$(LDFLAGS)' -o $(TESTBIN)/ ./cmd/droverd ./cmd/droverctl
	CGO_ENABLED=0 $(GO) build -ldflags '$(LDFLAGS)' -o $(TESTBIN)/ ./cmd/drover-hold

install: build ## install binaries, systemd units and the drover group (PREFIX, UNITDIR, DESTDIR)
	./systemd/install.sh

test: deps lint unit e2e ## everything CI runs: lint, unit and in-process tests, end-to-end on the lab

unit: ## unit, in-process cluster and built-binary tests, with -race (and the crash points' own test build)
	$(GO) test -race -count=1 -timeout 20m ./...
	$(GO) test -race -count=1 -tags crashpoints ./internal/crashpoint/

e2e: build-test ## end-to-end tests on a lab of network-namespace hosts (needs root)
	set -o pipefail; DROVER_E2E=1 DROVER_BIN=$(CURDIR)/$(TESTBIN) $(GO) test -race -count=1 -timeout 55m -run 'TestLab' -v ./e2e/ 2>&1 | tee $(BIN)/e2e.log \
		|| { awk -f .ci/failure-summary.awk $(BIN)/e2e.log; exit 1; }

lint: ## go vet, staticcheck, gofmt; no tracked binaries or files over 2 MiB
	./.ci/check-tracked-files.sh
	$(GO) vet ./...
	$(GO) vet -tags crashpoints ./...
	$(STATICCHECK) ./...
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt: files above need formatting"; exit 1; }

fuzz: ## run each fuzz target for a while (FUZZTIME, default 60s)
	$(GO) test -run '^$$' -fuzz '^FuzzDecode$$' -fuzztime $${FUZZTIME:-60s} ./fsm/
	$(GO) test -run '^$$' -fuzz '^FuzzReadSnapshot$$' -fuzztime $${FUZZTIME:-60s} ./fsm/
	$(GO) test -run '^$$' -fuzz '^FuzzParse$$' -fuzztime $${FUZZTIME:-60s} ./agent/manifest/
	$(GO) test -run '^$$' -fuzz '^FuzzRequestDecoding$$' -fuzztime $${FUZZTIME:-60s} ./agent/peer/

bench: deps build-test ## benchmarks on a lab of real hosts, and in-process ones; results in bench/results/
	@mkdir -p bench/results
	set -o pipefail; $(GO) test -run '^$$' -bench . -benchtime $${BENCHTIME:-500x} $$($(GO) list ./... | grep -v /e2e) | tee bench/results/go-bench.txt
	set -o pipefail; DROVER_E2E=1 DROVER_BENCH=1 DROVER_BIN=$(CURDIR)/$(TESTBIN) DROVER_BENCH_OUT=$(CURDIR)/bench/results \
		$(GO) test -run '^$$' -bench 'Benchmark(Lab|Standby|Scale)$$' -benchtime 1x -timeout 90m -v ./e2e/ | tee bench/results/lab-bench.log

demo: deps build ## bring up a 3-host lab and show drover's job on it
	./lab/demo.sh

clean: ## remove built binaries
	rm -rf $(BIN)
