package cluster

import (
	"bytes"
	"io"
	"strings"
)

// keyErrorText is what memberlist says when a message was encrypted with
// another key (or not at all).
var keyErrorTexts = []string{
	"No installed keys could decrypt",
	"Encryption is configured but remote state is not encrypted",
	"failed to decrypt",
}

func isKeyError(err error) bool {
	for _, t := range keyErrorTexts {
		if strings.Contains(err.Error(), t) {
			return true
		}
	}
	return false
}

// keyHintWriter adds a plain explanation to memberlist's log lines about
// undecryptable messages: an operator reading "No installed keys could
// decrypt the message" should learn that a machine with another cluster
// key is knocking.
type keyHintWriter struct{ next io.Writer }

func (w *keyHintWriter) Write(p []byte) (int, error) {
	for _, t := range keyErrorTexts {
		if bytes.Contains(p, []byte(t)) {
			line := bytes.TrimRight(p, "\n")
			hinted := append(append([]byte{}, line...), []byte(" (a machine whose cluster key differs from ours was refused)\n")...)
			if _, err := w.next.Write(hinted); err != nil {
				return 0, err
			}
			return len(p), nil
		}
	}
	return w.next.Write(p)
}
