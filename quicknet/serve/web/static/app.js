// QuickNet's page: pick or drop images, POST each to classify, show its top classes (the server's
// default top-k, 5, as the CLI and the client use) with score bars and timings. No build step, no dependency; URLs are relative so the page works under a path prefix.
"use strict";

(() => {
  const PARALLEL = 4; // requests in flight at once; the server batches them anyway
  const KEY_NAME = "quicknet.apiKey"; // sessionStorage only: gone when the tab closes

  const $ = (id) => document.getElementById(id);
  const picker = $("files");
  const results = $("results");
  const status = $("status");
  const keyForm = $("key-form");
  const keyInput = $("api-key");
  const keyWhy = $("key-why");
  const keySet = $("key-set");

  let memoryKey = null; // where sessionStorage is blocked: this page's lifetime only
  let waitingForKey = []; // items answered 401, sent again once a key is given
  const queue = [];
  let running = 0;
  let pending = 0;

  function getKey() {
    try {
      return sessionStorage.getItem(KEY_NAME) || memoryKey;
    } catch {
      return memoryKey;
    }
  }

  function setKey(key) {
    memoryKey = key;
    try {
      if (key) sessionStorage.setItem(KEY_NAME, key);
      else sessionStorage.removeItem(KEY_NAME);
    } catch {
      // storage blocked: memoryKey serves
    }
    keySet.hidden = !key;
  }

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    Object.assign(node, props);
    node.append(...children);
    return node;
  }

  // "decode;dur=1.20, queue;dur=0.10, infer;dur=2.00" -> [["decode", 1.2], ...]
  function parseServerTiming(header) {
    if (!header) return [];
    return header
      .split(",")
      .map((entry) => {
        const [name, ...params] = entry.split(";").map((s) => s.trim());
        const dur = params.find((p) => p.startsWith("dur="));
        return name && dur ? [name, Number.parseFloat(dur.slice(4))] : null;
      })
      .filter((pair) => pair && Number.isFinite(pair[1]));
  }

  const ms = (value) => `${value < 10 ? value.toFixed(2) : value.toFixed(1)} ms`;

  function addCard(file) {
    const url = URL.createObjectURL(file);
    const img = el("img", { src: url, alt: `Image ${file.name}` });
    img.addEventListener("load", () => URL.revokeObjectURL(url), { once: true });
    const body = el("div", { className: "body" }, el("p", { className: "pending" }, "Classifying…"));
    const card = el("li", { className: "result" }, el("h2", { className: "name" }, file.name), img, body);
    card.setAttribute("aria-busy", "true");
    return { file, card, body };
  }

  // One line for screen readers per image, the last one saying that nothing is left to wait for.
  function finish(item, message) {
    item.card.removeAttribute("aria-busy");
    pending -= 1;
    const idle = pending === 0 && waitingForKey.length === 0;
    status.textContent = idle ? `${message}. Done.` : message;
  }

  function showError(item, message) {
    item.body.replaceChildren(el("p", { className: "error" }, message));
    item.card.classList.add("failed");
    finish(item, `${item.file.name}: ${message}`);
  }

  function showPredictions(item, doc, roundTripMs, timing) {
    // one `images` part is answered with a list per image; accept the flat shape too
    const rows = Array.isArray(doc.predictions[0]) ? doc.predictions[0] : doc.predictions;
    const list = el("ol", { className: "labels" });
    list.setAttribute("aria-label", `Top ${rows.length} labels for ${item.file.name}`);
    for (const p of rows) {
      const pct = `${(p.score * 100).toFixed(1)}%`;
      const bar = el("meter", { min: 0, max: 1, value: p.score });
      bar.setAttribute("aria-hidden", "true"); // the percentage beside it says the same
      list.append(
        el("li", {}, el("span", { className: "label" }, p.label), bar, el("span", { className: "score" }, pct)),
      );
    }
    const parts = [`Round trip ${ms(roundTripMs)}`];
    if (timing.length) parts.push(`server: ${timing.map(([name, dur]) => `${name} ${ms(dur)}`).join(", ")}`);
    item.body.replaceChildren(
      list,
      el("p", { className: "timing" }, parts.join(" · ")),
      el("p", { className: "model" }, `${doc.model} version ${doc.version}`),
    );
    finish(item, `${item.file.name}: ${rows[0] ? rows[0].label : "no label"}`);
  }

  function askForKey(item, refusedKey) {
    waitingForKey.push(item);
    item.body.replaceChildren(el("p", { className: "pending" }, "Waiting for an API key…"));
    if (refusedKey) setKey(null);
    keyWhy.textContent = refusedKey
      ? "The server refused that API key. Paste another one."
      : "This server asks for an API key.";
    if (keyForm.hidden) {
      keyForm.hidden = false;
      keyInput.focus();
    }
    status.textContent = "The server needs an API key.";
  }

  async function classify(item) {
    const form = new FormData();
    form.append("images", item.file, item.file.name);
    const key = getKey();
    const headers = key ? { Authorization: `Bearer ${key}` } : {};
    const start = performance.now();
    let response;
    let doc = null;
    try {
      response = await fetch("classify", { method: "POST", body: form, headers });
      doc = await response.json().catch(() => null);
    } catch (e) {
      showError(item, `network error: ${e.message}`);
      return;
    }
    const roundTrip = performance.now() - start;
    if (response.status === 401) askForKey(item, key);
    else if (!response.ok) showError(item, (doc && doc.error) || `HTTP ${response.status}`);
    else if (!doc || !Array.isArray(doc.predictions)) showError(item, "unexpected answer from the server");
    else showPredictions(item, doc, roundTrip, parseServerTiming(response.headers.get("Server-Timing")));
  }

  function pump() {
    while (running < PARALLEL && queue.length) {
      const item = queue.shift();
      running += 1;
      classify(item).finally(() => {
        running -= 1;
        pump();
      });
    }
  }

  function submit(items) {
    queue.push(...items);
    pump();
  }

  function accept(fileList) {
    const files = Array.from(fileList).filter((f) => f.type === "" || f.type.startsWith("image/"));
    if (!files.length) {
      status.textContent = "No image among those files.";
      return;
    }
    pending += files.length;
    status.textContent = `Classifying ${files.length} image${files.length > 1 ? "s" : ""}…`;
    const items = files.map(addCard);
    results.prepend(...items.map((item) => item.card)); // newest pick first, each in its own order
    submit(items);
  }

  picker.addEventListener("change", () => {
    accept(picker.files);
    picker.value = ""; // picking the same file again fires `change` again
  });

  // Drop anywhere: the whole page is the target, and a missed drop never navigates away.
  document.addEventListener("dragover", (e) => {
    e.preventDefault();
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragleave", (e) => {
    if (!e.relatedTarget) document.body.classList.remove("dragging");
  });
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    document.body.classList.remove("dragging");
    if (e.dataTransfer && e.dataTransfer.files.length) accept(e.dataTransfer.files);
  });

  keyForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const key = keyInput.value.trim();
    if (!key) return;
    setKey(key);
    keyInput.value = "";
    keyForm.hidden = true;
    const retry = waitingForKey;
    waitingForKey = [];
    if (retry.length) {
      status.textContent = `Classifying ${retry.length} image${retry.length > 1 ? "s" : ""}…`;
      for (const item of retry) item.body.replaceChildren(el("p", { className: "pending" }, "Classifying…"));
      submit(retry);
    }
    picker.focus();
  });

  $("forget-key").addEventListener("click", () => {
    setKey(null);
    status.textContent = "API key forgotten.";
    picker.focus();
  });

  setKey(getKey()); // shows "Using an API key" when this tab already holds one
})();
