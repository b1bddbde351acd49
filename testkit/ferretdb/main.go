// Command ferretdb serves the MongoDB wire protocol, for the test harness (weir-testkit):
// FerretDB's embeddable package behind a few flags of our own. With -postgresql-url it
// stores on PostgreSQL, whose backend pushes a filter's equalities down to SQL (the SQLite
// backend only pushes down a filter of a lone string `_id`, so every other update scans the
// whole collection); without it, on SQLite files in -dir.
//
//	ferretdb -listen 127.0.0.1:27017 -dir /tmp/data -postgresql-url postgres://127.0.0.1:5432/ferretdb
package main

import (
	"context"
	"flag"
	"log"
	"os"
	"os/signal"
	"syscall"

	"github.com/FerretDB/FerretDB/ferretdb"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:27017", "TCP address to listen on")
	dir := flag.String("dir", "", "directory for the SQLite databases")
	pg := flag.String("postgresql-url", "", "PostgreSQL URL: store on PostgreSQL instead of SQLite")
	flag.Parse()
	if *dir == "" {
		log.Fatal("-dir is required")
	}

	config := &ferretdb.Config{
		Listener:  ferretdb.ListenerConfig{TCP: *listen},
		Handler:   "sqlite",
		SQLiteURL: "file:" + *dir + "/",
	}
	if *pg != "" {
		config.Handler = "postgresql"
		config.PostgreSQLURL = *pg
	}
	f, err := ferretdb.New(config)
	if err != nil {
		log.Fatal(err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	log.Printf("listening on %s", *listen)
	if err := f.Run(ctx); err != nil && ctx.Err() == nil {
		log.Fatal(err)
	}
}
