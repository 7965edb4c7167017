// Package walwatch will follow the mounted PostgreSQL data directory
// (inotify + FIEMAP) and feed the block → relfilenode index that gives each
// relation and the WAL its own data key (DESIGN.md, "Watching PostgreSQL").
// Not implemented yet: until it is, every block is encrypted with the
// volume key. The volume format already holds the key slots, their owners
// and the per-block key map it needs.
package walwatch
