package main

import (
	"fmt"
	"io"
	"os"
	"slices"
	"sync"
	"time"
)

// board shows the progress of a long operation, one line per item (a
// service on a machine). On a terminal the lines are redrawn in place as
// they change (at most every redrawEvery); elsewhere a line is printed
// only when an item's state changes, not its byte counts, so logs stay
// short.
type board struct {
	mu     sync.Mutex
	w      io.Writer
	tty    bool
	keys   []string
	lines  map[string]string
	states map[string]string // plain mode: the state last printed
	drawn  int
	last   time.Time
}

// redrawEvery bounds a terminal's redraws.
const redrawEvery = 100 * time.Millisecond

func newBoard(w io.Writer) *board {
	f, ok := w.(*os.File)
	return &board{w: w, tty: ok && isTerminal(f), lines: map[string]string{}, states: map[string]string{}}
}

// set shows item key as line; state is what a plain output prints on:
// the line without its changing figures ("": the state did not change,
// only figures did).
func (b *board) set(key, state, line string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !slices.Contains(b.keys, key) {
		b.keys = append(b.keys, key)
	}
	if state == "" {
		state = b.states[key]
	}
	if !b.tty {
		if b.states[key] != state {
			b.states[key] = state
			fmt.Fprintln(b.w, line)
		}
		return
	}
	changed := b.states[key] != state
	b.lines[key], b.states[key] = line, state
	if changed || time.Since(b.last) >= redrawEvery {
		b.redraw()
	}
}

// redraw writes every item's line over the ones drawn before.
func (b *board) redraw() {
	if b.drawn > 0 {
		fmt.Fprintf(b.w, "\033[%dA", b.drawn)
	}
	for _, k := range b.keys {
		fmt.Fprintf(b.w, "\r\033[K%s\n", b.lines[k])
	}
	b.drawn, b.last = len(b.keys), time.Now()
}

// done draws the final lines on a terminal.
func (b *board) done() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.tty && len(b.keys) > 0 {
		b.redraw()
	}
}
