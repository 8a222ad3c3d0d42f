// Command testimage is the workload of drover's lab: an HTTP server that
// reads and writes files on its volume and journals every acknowledged
// write with a sequence number, so a test can check that none was lost
// across a move. It is built static and shipped in an image FROM scratch.
package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

var keyPattern = regexp.MustCompile(`^[A-Za-z0-9._-]{1,128}$`)

type store struct {
	dir string
	mu  sync.Mutex
	seq int64
}

// write stores data under key atomically, then journals it; the sequence
// number is returned only once both are on disk.
func (s *store) write(key string, data []byte) (int64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	tmp := filepath.Join(s.dir, "."+key+".tmp")
	if err := writeSync(tmp, data, os.O_CREATE|os.O_TRUNC|os.O_WRONLY); err != nil {
		return 0, err
	}
	if err := os.Rename(tmp, filepath.Join(s.dir, key)); err != nil {
		return 0, err
	}
	s.seq++
	sum := sha256.Sum256(data)
	line := fmt.Sprintf("%d %s %s\n", s.seq, key, hex.EncodeToString(sum[:]))
	if err := writeSync(filepath.Join(s.dir, "journal"), []byte(line), os.O_CREATE|os.O_APPEND|os.O_WRONLY); err != nil {
		return 0, err
	}
	return s.seq, nil
}

func writeSync(path string, data []byte, flags int) error {
	f, err := os.OpenFile(path, flags, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// lastSeq reads the journal's last sequence number, so numbering goes on
// after a restart or a move.
func lastSeq(dir string) int64 {
	b, err := os.ReadFile(filepath.Join(dir, "journal"))
	if err != nil {
		return 0
	}
	var last int64
	for _, line := range splitLines(b) {
		var n int64
		if _, err := fmt.Sscanf(line, "%d", &n); err == nil && n > last {
			last = n
		}
	}
	return last
}

func splitLines(b []byte) []string {
	var out []string
	start := 0
	for i, c := range b {
		if c == '\n' {
			out = append(out, string(b[start:i]))
			start = i + 1
		}
	}
	return out
}

// hash is a sha256 over every file's name and content, sorted by name.
func (s *store) hash() (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return "", err
	}
	names := []string{}
	for _, e := range entries {
		if e.Type().IsRegular() && e.Name()[0] != '.' {
			names = append(names, e.Name())
		}
	}
	sort.Strings(names)
	h := sha256.New()
	for _, n := range names {
		f, err := os.Open(filepath.Join(s.dir, n))
		if err != nil {
			return "", err
		}
		fmt.Fprintf(h, "%s\n", n)
		_, err = io.Copy(h, f)
		f.Close()
		if err != nil {
			return "", err
		}
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// fill writes blocks at rate bytes/s until ctx ends.
func (s *store) fill(ctx context.Context, rate int64) {
	const block = 64 << 10
	interval := time.Duration(float64(time.Second) * block / float64(rate))
	tick := time.NewTicker(interval)
	defer tick.Stop()
	buf := make([]byte, block)
	for i := 0; ; i++ {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		rand.Read(buf)
		if _, err := s.write(fmt.Sprintf("fill-%06d.bin", i%4096), buf); err != nil {
			log.Printf("background write: %v", err)
		}
	}
}

func main() {
	dir := envOr("DATA_DIR", "/data")
	port := envOr("PORT", "8080")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		log.Fatal(err)
	}
	s := &store{dir: dir, seq: lastSeq(dir)}
	logWrites := os.Getenv("LOG_WRITES") != ""
	mux := http.NewServeMux()
	var sick atomic.Bool // POST /sick: /healthz fails until the process restarts
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		if sick.Load() {
			http.Error(w, "sick", http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("POST /sick", func(w http.ResponseWriter, _ *http.Request) { sick.Store(true) })
	mux.HandleFunc("GET /file", func(w http.ResponseWriter, r *http.Request) {
		// A file of the container (a secret): its bytes, mode and owner.
		p := r.URL.Query().Get("path")
		fi, err := os.Stat(p)
		if !filepath.IsAbs(p) || err != nil {
			http.Error(w, fmt.Sprintf("%s: %v", p, err), http.StatusNotFound)
			return
		}
		b, err := os.ReadFile(p)
		if err != nil {
			http.Error(w, err.Error(), http.StatusForbidden)
			return
		}
		st := fi.Sys().(*syscall.Stat_t)
		w.Header().Set("X-Mode", fmt.Sprintf("%04o", fi.Mode().Perm()))
		w.Header().Set("X-Owner", fmt.Sprintf("%d:%d", st.Uid, st.Gid))
		w.Write(b)
	})
	mux.HandleFunc("GET /resolve", func(w http.ResponseWriter, r *http.Request) {
		// A name as the container's resolver answers it.
		ctx, cancel := context.WithTimeout(r.Context(), 3*time.Second)
		defer cancel()
		addrs, err := net.DefaultResolver.LookupHost(ctx, r.URL.Query().Get("name"))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		sort.Strings(addrs)
		io.WriteString(w, strings.Join(addrs, " ")+"\n")
	})
	mux.HandleFunc("GET /fetch", func(w http.ResponseWriter, r *http.Request) {
		// Another service, by the URL given (by name).
		c := http.Client{Timeout: 3 * time.Second}
		resp, err := c.Get(r.URL.Query().Get("url"))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		defer resp.Body.Close()
		w.WriteHeader(resp.StatusCode)
		io.Copy(w, io.LimitReader(resp.Body, 1<<20))
	})
	mux.HandleFunc("POST /write", func(w http.ResponseWriter, r *http.Request) {
		key := r.URL.Query().Get("key")
		if !keyPattern.MatchString(key) || key == "journal" {
			http.Error(w, "bad key", http.StatusBadRequest)
			return
		}
		data, err := io.ReadAll(io.LimitReader(r.Body, 64<<20))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		seq, err := s.write(key, data)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		if logWrites {
			// Logged before the answer: every acknowledged write is in the log.
			log.Printf("wrote %s seq %d", key, seq)
		}
		json.NewEncoder(w).Encode(map[string]int64{"seq": seq})
	})
	mux.HandleFunc("GET /read", func(w http.ResponseWriter, r *http.Request) {
		key := r.URL.Query().Get("key")
		if !keyPattern.MatchString(key) {
			http.Error(w, "bad key", http.StatusBadRequest)
			return
		}
		http.ServeFile(w, r, filepath.Join(dir, key))
	})
	mux.HandleFunc("GET /journal", func(w http.ResponseWriter, r *http.Request) {
		http.ServeFile(w, r, filepath.Join(dir, "journal"))
	})
	mux.HandleFunc("GET /hash", func(w http.ResponseWriter, _ *http.Request) {
		h, err := s.hash()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		io.WriteString(w, h+"\n")
	})

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if after, err := time.ParseDuration(os.Getenv("EXIT_AFTER")); err == nil {
		// A service that crashes: it exits with EXIT_CODE after a while.
		code, _ := strconv.Atoi(os.Getenv("EXIT_CODE"))
		time.AfterFunc(after, func() { log.Printf("exiting with code %d, as asked", code); os.Exit(code) })
	}
	var wg sync.WaitGroup
	if rate, _ := strconv.ParseInt(os.Getenv("WRITE_RATE_BYTES"), 10, 64); rate > 0 {
		wg.Add(1)
		go func() { defer wg.Done(); s.fill(ctx, rate) }()
	}
	srv := &http.Server{Addr: ":" + port, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	log.Printf("testimage serving %s on :%s", dir, port)
	if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Fatal(err)
	}
	wg.Wait()
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}
