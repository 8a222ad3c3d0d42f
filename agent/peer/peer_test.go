package peer_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/drover-sh/drover/agent/peer"
	"github.com/drover-sh/drover/agent/peer/peertest"
)

type echoReq struct {
	Word string `json:"word"`
}
type echoResp struct {
	Word string `json:"word"`
	From string `json:"from"`
}

var (
	errNoSuchWord = peer.NewError("no_such_word", "no such word")
	routeEcho     = peer.Route[echoReq, echoResp]{Path: "test/echo"}
	routeCount    = peer.Stream[echoReq, int, string]{Path: "test/count"}
	routeUpload   = peer.Upload[echoReq, echoResp]{Path: "test/upload"}
)

func twoMachines(t *testing.T) (*peertest.Net, *peertest.Host, *peertest.Host) {
	n := peertest.New(t)
	a, b := n.Add("a"), n.Add("b")
	s := peer.Server{Mux: b, IDs: b}
	peer.Handle(s, routeEcho, func(ctx context.Context, from string, req echoReq) (echoResp, error) {
		if req.Word == "missing" {
			return echoResp{}, fmt.Errorf("looking up %q: %w", req.Word, errNoSuchWord)
		}
		if again := peer.From(ctx); again != from {
			return echoResp{}, fmt.Errorf("From(ctx) = %q, from = %q", again, from)
		}
		return echoResp{Word: req.Word, From: from}, nil
	})
	peer.HandleStream(s, routeCount, func(_ context.Context, _ string, req echoReq, emit func(int)) (string, error) {
		for i := range 3 {
			emit(i)
		}
		if req.Word == "missing" {
			return "", errNoSuchWord
		}
		return "counted " + req.Word, nil
	})
	peer.HandleUpload(s, routeUpload, func(_ context.Context, from string, req echoReq, body peer.Body) (echoResp, error) {
		if err := body.SetReadDeadline(time.Now().Add(time.Second)); err != nil {
			return echoResp{}, err
		}
		b, err := io.ReadAll(body)
		return echoResp{Word: req.Word + ":" + string(b), From: from}, err
	})
	return n, a, b
}

func TestRouteNamesTheCallerAndKeepsErrorIdentity(t *testing.T) {
	n, a, b := twoMachines(t)
	ctx := context.Background()
	got, err := routeEcho.Call(ctx, a, "b", echoReq{Word: "hi"})
	if err != nil || got.Word != "hi" || got.From != "a" {
		t.Fatalf("echo = %+v, %v; want hi from a", got, err)
	}
	_, err = routeEcho.Call(ctx, a, "b", echoReq{Word: "missing"})
	if !errors.Is(err, errNoSuchWord) || !strings.Contains(err.Error(), `looking up "missing"`) {
		t.Fatalf("error %v: want errNoSuchWord with its context", err)
	}
	var remote *peer.RemoteError
	if !errors.As(err, &remote) || remote.Machine != "b" || remote.Code != "no_such_word" {
		t.Fatalf("error %#v is not b's no_such_word", err)
	}
	if errors.Is(err, peer.ErrBadRequest) {
		t.Fatal("one code matched another sentinel")
	}
	// A process that is no machine of the net is named by nobody.
	resp, err := n.Raw().Post(b.URL(routeEcho.Path), "application/json", strings.NewReader(`{"word":"hi"}`))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(raw), `"from":""`) {
		t.Fatalf("a non-member was named: %d %s", resp.StatusCode, raw)
	}
}

func TestRouteRefusesMalformedAndUnknownFields(t *testing.T) {
	_, _, b := twoMachines(t)
	for _, body := range []string{"{", `{"word": 3}`, `{"word": "x", "extra": 1}`, strings.Repeat(" ", 2<<20) + "{}"} {
		resp, err := http.Post(b.URL(routeEcho.Path), "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		msg, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(msg), `"code":"bad_request"`) || !strings.Contains(string(msg), "test/echo") {
			t.Errorf("body %.20q: %d %s; want 400 bad_request naming the route", body, resp.StatusCode, msg)
		}
	}
}

func TestStreamPassesLinesThenResultOrError(t *testing.T) {
	_, a, _ := twoMachines(t)
	var lines []int
	res, err := routeCount.Call(context.Background(), a, "b", echoReq{Word: "sheep"}, func(i int) { lines = append(lines, i) })
	if err != nil || res != "counted sheep" || fmt.Sprint(lines) != "[0 1 2]" {
		t.Fatalf("stream = %q, %v, lines %v", res, err, lines)
	}
	_, err = routeCount.Call(context.Background(), a, "b", echoReq{Word: "missing"}, func(int) {})
	if !errors.Is(err, errNoSuchWord) {
		t.Fatalf("stream error %v: want errNoSuchWord", err)
	}
}

func TestUploadCarriesTheRequestBesideTheData(t *testing.T) {
	_, a, _ := twoMachines(t)
	got, err := routeUpload.Call(context.Background(), a, "b", echoReq{Word: "vol"}, strings.NewReader("bytes"))
	if err != nil || got.Word != "vol:bytes" || got.From != "a" {
		t.Fatalf("upload = %+v, %v", got, err)
	}
	if _, err := routeUpload.Call(context.Background(), a, "nobody", echoReq{}, strings.NewReader("")); err == nil || !strings.Contains(err.Error(), "nobody") {
		t.Fatalf("upload to an unknown machine: %v", err)
	}
}

func TestCodeOfWalksWrappedAndJoinedErrors(t *testing.T) {
	inner := &peer.RemoteError{Machine: "b", Code: "no_such_word", Message: "x"}
	for _, c := range []struct {
		err  error
		want string
	}{
		{nil, ""},
		{errors.New("plain"), ""},
		{fmt.Errorf("ctx: %w", errNoSuchWord), "no_such_word"},
		{errors.Join(errors.New("a"), fmt.Errorf("b: %w", peer.ErrNotInCluster)), "not_in_cluster"},
		{fmt.Errorf("relayed: %w", inner), "no_such_word"},
	} {
		if got := peer.CodeOf(c.err); got != c.want {
			t.Errorf("CodeOf(%v) = %q, want %q", c.err, got, c.want)
		}
	}
	if peer.Wire(nil) != nil || peer.Wire(nil).Err("b") != nil {
		t.Fatal("nil error crossed as non-nil")
	}
}
