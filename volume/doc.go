// Package volume is an open tdeshim volume: it turns block reads and writes
// into ciphertext in the backing store, keeps the per-block key map, and
// makes key-map changes durable no later than the writes that need them.
// It is the Device the nbd package serves.
//
// Crash-safety rules (DESIGN.md invariants 3–5), as implemented here:
//
//   - A write to a FREE block stores its ciphertext first; the key-map entry
//     naming its slot reaches the journal only after a sync that covers the
//     data. A crash in between leaves the block FREE (its old content).
//   - A trim marks the block FREE in memory at once (it reads as zeros), but
//     remembers the slot it had; the hole is punched only after the FREE
//     entry is journaled and synced. A write that lands before then reuses
//     the remembered slot, so the block never changes key inline while the
//     disk may still say it has the old one.
//   - Live blocks are overwritten under the key they have.
//
// The journal, checkpoint and header layout are in package layout.
package volume
