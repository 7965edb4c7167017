// Package walwatch follows the mounted PostgreSQL data directory and feeds
// the block → file index (layout.Index) that gives every relfilenode and
// the WAL its own data key (DESIGN.md, "Watching PostgreSQL").
//
// It waits for the filesystem to be mounted, checks that the mount is this
// volume (the ext4 UUID read through the volume must match the mounted
// filesystem's id), scans the tree, then follows it with inotify: a file
// created, extended or renamed is mapped with FIEMAP (no sync flag: it
// never forces writeback) and its extents replace what the index knew; a
// file removed leaves it; a queue overflow brings a full rescan. Files map
// to owners by path alone (ParsePath). Before a relation's extents are
// published its key is created, so its later writes are keyed inline.
//
// It also starts crypto-shredding: a relfilenode with a key but no files
// for the grace period (and, with a catalog, unknown to it) has its key
// retired; the volume's rekeyer moves any block the filesystem has reused
// and then destroys the key.
//
// Nothing here runs on the I/O path; the I/O path only reads the index.
package walwatch
