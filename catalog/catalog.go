// Package catalog reads PostgreSQL's catalog over a connection (serve
// --dsn): relation names for status, and a second opinion before a
// relfilenode's key is shredded. It is optional and only enriches: keys
// follow file paths, and nothing on the I/O path ever waits for it.
package catalog

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tdeshim/tdeshim/layout"
)

// Catalog caches relfilenode → name for every database that accepts
// connections.
type Catalog struct {
	dsn string
	log *slog.Logger

	mu      sync.Mutex
	names   map[layout.RelKey]string
	closed  map[uint32]bool // databases we cannot connect to (datallowconn = false)
	loaded  time.Time
	lastErr error
}

// New returns a catalog for the server at dsn (a libpq connection string
// or URL; the database in it is the one to list databases from).
func New(dsn string, log *slog.Logger) (*Catalog, error) {
	if _, err := pgx.ParseConfig(dsn); err != nil {
		return nil, fmt.Errorf("--dsn: %w", err)
	}
	if log == nil {
		log = slog.Default()
	}
	return &Catalog{dsn: dsn, log: log}, nil
}

// refreshAge: names older than this are reloaded (in the background for
// Name, at once for Known).
const refreshAge = 30 * time.Second

// Refresh reloads every database's relfilenodes.
func (c *Catalog) Refresh(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	names, closed, err := c.load(ctx)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.lastErr = err
	if err != nil {
		return err
	}
	c.names, c.closed, c.loaded = names, closed, time.Now()
	return nil
}

type database struct {
	oid, spc uint32
	name     string
	allow    bool
}

func (c *Catalog) load(ctx context.Context) (map[layout.RelKey]string, map[uint32]bool, error) {
	conn, err := pgx.Connect(ctx, c.dsn)
	if err != nil {
		return nil, nil, fmt.Errorf("catalog: connect: %w", err)
	}
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, "SELECT oid, datname, dattablespace, datallowconn FROM pg_database")
	if err != nil {
		return nil, nil, fmt.Errorf("catalog: list databases: %w", err)
	}
	var dbs []database
	for rows.Next() {
		var d database
		if err := rows.Scan(&d.oid, &d.name, &d.spc, &d.allow); err != nil {
			return nil, nil, err
		}
		dbs = append(dbs, d)
	}
	if err := rows.Err(); err != nil {
		return nil, nil, err
	}
	names := map[layout.RelKey]string{}
	closed := map[uint32]bool{}
	for _, d := range dbs {
		if !d.allow {
			closed[d.oid] = true
			continue
		}
		if err := c.loadDatabase(ctx, d, names); err != nil {
			return nil, nil, err
		}
	}
	return names, closed, nil
}

// loadDatabase adds one database's relations (and the shared catalogs).
func (c *Catalog) loadDatabase(ctx context.Context, d database, names map[layout.RelKey]string) error {
	cfg, err := pgx.ParseConfig(c.dsn)
	if err != nil {
		return err
	}
	cfg.Database = d.name
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return fmt.Errorf("catalog: connect to database %q: %w", d.name, err)
	}
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, `
SELECT n.nspname, c.relname, c.relkind::text, pg_relation_filenode(c.oid), c.reltablespace
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE pg_relation_filenode(c.oid) IS NOT NULL AND c.relpersistence <> 't'`)
	if err != nil {
		return fmt.Errorf("catalog: read pg_class of %q: %w", d.name, err)
	}
	defer rows.Close()
	for rows.Next() {
		var nsp, rel, kind string
		var node, spc uint32
		if err := rows.Scan(&nsp, &rel, &kind, &node, &spc); err != nil {
			return err
		}
		k := layout.RelKey{Tablespace: spc, Database: d.oid, RelNode: node}
		switch spc {
		case 0:
			k.Tablespace = d.spc
		}
		db := d.name
		if k.Tablespace == layout.GlobalTablespace {
			k.Database, db = 0, "(shared)" // shared catalogs live in global/
		}
		names[k] = Describe(db, nsp, rel, kind)
	}
	return rows.Err()
}

// Describe renders a relation for status: database.schema.name, with its
// kind when it is not a table.
func Describe(db, nsp, rel, kind string) string {
	s := db + "." + nsp + "." + rel
	switch kind {
	case "i", "I":
		s += " (index)"
	case "S":
		s += " (sequence)"
	case "t":
		s += " (TOAST)"
	case "m":
		s += " (materialized view)"
	}
	return s
}

// Name returns rel's name from the cache; a stale cache is reloaded in the
// background.
func (c *Catalog) Name(rel layout.RelKey) (string, bool) {
	c.mu.Lock()
	n, ok := c.names[rel]
	stale := time.Since(c.loaded) > refreshAge
	if stale {
		c.loaded = time.Now() // one reload at a time
	}
	c.mu.Unlock()
	if stale {
		go func() {
			if err := c.Refresh(context.Background()); err != nil {
				c.log.Debug("catalog refresh failed; names may be missing", "err", err)
			}
		}()
	}
	return n, ok
}

// Known reports whether the catalog still has rel (after a fresh reload).
// A relation of a database that refuses connections counts as known: the
// catalog cannot say it is gone.
func (c *Catalog) Known(ctx context.Context, rel layout.RelKey) (bool, error) {
	if err := c.Refresh(ctx); err != nil {
		return true, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed[rel.Database] {
		return true, nil
	}
	_, ok := c.names[rel]
	return ok, nil
}
