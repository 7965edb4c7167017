# tdeshim — see README.md. `make demo` and `make test` do all set-up.
GO        ?= go
BIN       := bin/tdeshim
# CI fuzzes by execution count: a time budget ends with the coordinator
# racing its own deadline on a loaded 2-core machine ("context deadline
# exceeded", no failing input), which is noise, not a finding.
FUZZTIME  ?= 50000x
FUZZ_LONG ?= 2m
CRASH_ITERATIONS ?= 400

.PHONY: all build deps test unit e2e lint fuzz fuzz-short bench demo crash-test clean

all: build

deps:
	./scripts/deps.sh

build:
	$(GO) build -trimpath -o $(BIN) ./cmd/tdeshim

lint:
	@test -z "$$(gofmt -l . | tee /dev/stderr)" || (echo "gofmt: files above need formatting" >&2; exit 1)
	$(GO) vet ./...

# Everything CI runs: lint, unit and end-to-end tests (real NBD clients,
# nbdfuse + loop + ext4, PyKMIP, PostgreSQL 15), the concurrent packages
# again under the race detector, the testcontainers variant (skips without
# Docker), a short run of every fuzz target, and a check that no loop
# device, FUSE mount or process was leaked.
test: deps lint
	TDESHIM_E2E_REQUIRE=1 $(GO) test -count=1 -timeout 25m ./...
	$(GO) test -race -count=1 ./volume/ ./nbd/ ./store/ ./layout/ ./walwatch/
	@echo "testcontainers variant (its own module; skips without a Docker engine):"
	cd e2e/containers && $(GO) vet ./... && $(GO) test -count=1 -v ./...
	$(MAKE) --no-print-directory fuzz-short
	./scripts/check-leaks.sh

unit:
	$(GO) test -count=1 -short ./crypto/... ./layout/... ./keys/... ./store/... ./volume/... ./nbd/... ./walwatch/...

e2e: build
	TDESHIM_E2E_REQUIRE=1 $(GO) test -count=1 -v ./e2e/...

FUZZ_TARGETS := layout:FuzzDecodeHeader layout:FuzzDecodeSlot layout:FuzzDecodeMapPage \
	layout:FuzzDecodeJournal layout:FuzzDecodeRekeyRecord layout:FuzzWALPageHeader \
	walwatch:FuzzParsePath walwatch:FuzzInotifyEvents nbd:FuzzNegotiation nbd:FuzzRequests

fuzz-short:
	@for t in $(FUZZ_TARGETS); do pkg=$${t%%:*}; fn=$${t#*:}; \
	  echo "fuzz $$pkg $$fn ($(FUZZTIME))"; \
	  $(GO) test ./$$pkg -run '^$$' -fuzz "^$$fn\$$" -fuzztime $(FUZZTIME) >/tmp/tdeshim-fuzz.log 2>&1 || { cat /tmp/tdeshim-fuzz.log; exit 1; }; \
	done

fuzz:
	$(MAKE) fuzz-short FUZZTIME=$(FUZZ_LONG)

# Many more crash points than the unit test's default, and 20 kill/power-
# loss cycles of PostgreSQL under pgbench each.
PG_CRASH_CYCLES ?= 20
crash-test: deps
	TDESHIM_CRASH_ITERATIONS=$(CRASH_ITERATIONS) $(GO) test -count=1 -run 'Crash|RekeyCut' -v ./volume/
	TDESHIM_E2E_REQUIRE=1 TDESHIM_PG_CRASH_CYCLES=$(PG_CRASH_CYCLES) $(GO) test -count=1 -timeout 60m -run 'PostgresSurvives' -v ./e2e/

bench: deps build
	./scripts/bench.sh

demo: deps build
	$(BIN) demo

clean:
	rm -rf bin
