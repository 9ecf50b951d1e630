"use strict";
// The labelling page: shows the server's next pair and posts each choice. The server owns all
// state (progress, which pair is next, undo), so a reload or a second tab never diverges.

const $ = (id) => document.getElementById(id);
const KEYS = { "1": "1", "2": "2", t: "tie", s: "skip" };
const SAID = { "1": "Saved: response 1 is better", "2": "Saved: response 2 is better",
               tie: "Saved as a tie", skip: "Skipped" };
let state = null;
let busy = false;  // one request at a time: a key pressed meanwhile must not label an unseen pair

async function call(method, path, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
  return data;
}

function render(next, message) {
  state = next;
  $("progress").textContent = `${state.done} / ${state.total}`;
  $("bar-fill").style.width = state.total ? `${(100 * state.done) / state.total}%` : "100%";
  const pair = state.next;
  $("pair").hidden = !pair;
  $("finished").hidden = Boolean(pair);
  $("out-path").textContent = state.out_path;
  const identical = state.identical_skipped || 0;
  $("identical").hidden = identical === 0;
  $("identical").textContent =
    `${identical} pair${identical === 1 ? "" : "s"} with two identical responses skipped (nothing to compare).`;
  if (pair) {
    $("pair-index").textContent = `pair #${pair.index + 1}`;
    $("prompt").textContent = pair.prompt;
    $("response-1").textContent = pair.a;
    $("response-2").textContent = pair.b;
  }
  for (const id of ["btn-1", "btn-2", "btn-tie", "btn-skip"]) $(id).disabled = !pair;
  $("btn-undo").disabled = !state.can_undo;
  showStatus(message || "", false);
}

function showStatus(text, isError) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

async function act(request, message) {
  if (busy) return;
  busy = true;
  document.body.classList.add("busy");
  try {
    render(await request(), message);
  } catch (err) {
    showStatus(err.message, true);
  } finally {
    busy = false;
    document.body.classList.remove("busy");
  }
}

function choose(choice) {
  if (!state || !state.next) return;
  const index = state.next.index;
  act(() => call("POST", "/api/label", { index, choice }), SAID[choice]);
}

function undo() {
  if (!state || !state.can_undo) return;
  act(() => call("POST", "/api/undo", {}), "Undone: that pair is shown again");
}

document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
  const key = event.key.toLowerCase();
  if (key in KEYS) choose(KEYS[key]);
  else if (key === "u") undo();
  else return;
  event.preventDefault();
});

for (const button of document.querySelectorAll("button[data-choice]")) {
  // blur: Enter/Space must not press the same button again on the next pair
  button.addEventListener("click", () => { button.blur(); choose(button.dataset.choice); });
}
$("btn-undo").addEventListener("click", () => { $("btn-undo").blur(); undo(); });
act(() => call("GET", "/api/state"));
