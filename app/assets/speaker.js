// omnistream demo page: plays the spoken answers (typed and spoken questions alike) with Web Audio.
//
// The page's hidden "speech-feed" textbox carries the session's AudioOut chunks, numbered (JSON,
// see demo.on_speech); its change event calls omniSpeaker.feed. Chunks of a turn are
// scheduled back to back a few milliseconds ahead; a flush (barge-in) stops what is queued of the
// turn at once. Browsers only let a page make sound after a user gesture: the audio context is
// created and resumed by the page's first click or key press (the Record button, for a user who
// only talks). An analyser on the output notes when each turn's sound is first heard
// (performance.now() milliseconds in omniSpeaker.heard) for the page's tests and the bench.
(() => {
  if (window.omniSpeaker) return;
  const LEAD_S = 0.03; // scheduling margin for a turn's first chunk (or after an underrun)
  const HEARD_RMS = 0.005;
  const S = {
    ctx: null,
    analyser: null,
    turns: {}, // turn -> {next, sources, final, chunks}
    heard: {}, // turn -> performance.now() when its first sound went out
    scheduled: {}, // turn -> performance.now() its first chunk was scheduled for
    lastSeq: 0, // the feed value last read
    lastIndex: -1, // the chunk last played (numbered by the feed)
    gaps: 0, // chunks the player never saw (should stay 0)
    chunks: 0,
    samples: 0,
    poll: null,
  };
  window.omniSpeaker = S;

  function status(text) {
    const el = document.querySelector("#speaker .omni-speaker-status");
    if (el) el.textContent = text;
  }

  S.unlock = () => {
    if (!S.ctx) {
      const Context = window.AudioContext || window.webkitAudioContext;
      if (!Context) return null;
      S.ctx = new Context({ latencyHint: "interactive" });
      S.analyser = S.ctx.createAnalyser();
      S.analyser.fftSize = 256;
      S.analyser.connect(S.ctx.destination);
    }
    if (S.ctx.state === "suspended") S.ctx.resume();
    return S.ctx;
  };
  for (const type of ["pointerdown", "keydown", "touchstart"]) {
    document.addEventListener(type, S.unlock, { capture: true, passive: true });
  }

  function watchOutput() {
    // polls the output while sound is scheduled: the first loud window of a turn is "heard"
    const data = new Float32Array(S.analyser.fftSize);
    S.analyser.getFloatTimeDomainData(data);
    let sum = 0;
    for (const v of data) sum += v * v;
    const now = S.ctx.currentTime;
    const playing = Object.entries(S.turns).filter(([, t]) => t.sources.length && t.first <= now);
    if (Math.sqrt(sum / data.length) > HEARD_RMS) {
      for (const [turn] of playing) if (!(turn in S.heard)) S.heard[turn] = performance.now();
    }
    const busy = Object.values(S.turns).some((t) => t.sources.length);
    if (!busy) {
      clearInterval(S.poll);
      S.poll = null;
      status("🔈 idle");
    }
  }

  function stop(turn) {
    const t = S.turns[turn];
    if (!t) return;
    for (const source of t.sources) {
      try {
        source.stop();
      } catch (e) {
        /* not started yet */
      }
    }
    t.sources = [];
    t.next = 0;
  }

  function play(item) {
    const ctx = S.unlock();
    if (!ctx) return;
    const bytes = Uint8Array.from(atob(item.pcm), (c) => c.charCodeAt(0));
    const ints = new Int16Array(bytes.buffer, 0, bytes.length >> 1);
    const floats = Float32Array.from(ints, (v) => v / 32768);
    const buffer = ctx.createBuffer(1, floats.length, item.rate);
    buffer.copyToChannel(floats, 0);
    const source = ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(S.analyser);
    const t = (S.turns[item.turn] ??= { next: 0, sources: [], final: false, chunks: 0, first: 0 });
    const at = Math.max(t.next, ctx.currentTime + LEAD_S);
    if (!t.chunks) {
      t.first = at;
      S.scheduled[item.turn] = performance.now() + (at - ctx.currentTime) * 1000;
    }
    source.start(at);
    t.next = at + buffer.duration;
    t.chunks += 1;
    t.sources.push(source);
    source.onended = () => {
      t.sources = t.sources.filter((s) => s !== source);
    };
    S.chunks += 1;
    S.samples += floats.length;
    S.poll ??= setInterval(watchOutput, 5);
    status(ctx.state === "running" ? "🔊 speaking" : "🔇 click anywhere on the page to hear the answer");
  }

  S.feed = (value) => {
    if (!value) return;
    let message;
    try {
      message = JSON.parse(value);
    } catch (e) {
      return;
    }
    if (message.seq <= S.lastSeq) return;
    S.lastSeq = message.seq;
    // Each value repeats the last chunks sent (a value the page replaced before its change event
    // ran is never seen): chunk numbers already played are skipped, a missing one is a gap.
    if (S.lastIndex < 0) S.lastIndex = message.first - 1;
    message.items.forEach((item, k) => {
      const index = message.first + k;
      if (index <= S.lastIndex) return;
      S.gaps += index - S.lastIndex - 1;
      S.lastIndex = index;
      if (item.flush) stop(item.turn); // barge-in: drop what is queued
      if (item.pcm) play(item);
      if (item.final && S.turns[item.turn]) S.turns[item.turn].final = true;
    });
  };
})();
