// Package iocount counts the bytes that pass through a reader, for
// progress reports while another goroutine reads.
package iocount

import (
	"io"
	"sync/atomic"
)

// Reader counts what is read through it; N may be read at any time.
type Reader struct {
	R io.Reader
	n atomic.Uint64
}

func (c *Reader) Read(b []byte) (int, error) {
	k, err := c.R.Read(b)
	c.n.Add(uint64(k))
	return k, err
}

// N is the number of bytes read so far.
func (c *Reader) N() uint64 { return c.n.Load() }
