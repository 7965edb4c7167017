// Package layout is the tdeshim on-disk format, version 1: where each
// structure lives in the backing store (offset functions) and how each is
// encoded and checked (encode/decode pairs). It does no I/O, so every
// decoder can be fuzzed and every byte pinned by golden vectors.
// docs/FORMAT.md is the prose specification of the same format.
package layout
