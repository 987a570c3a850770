// The pgbridge inspector: a page on the bridge's own JavaScript client (/client.js), nothing more. The
// client reconnects, resumes after the last event and refuses duplicates; this page only shows.
// Row values are untrusted: everything is rendered with textContent, never as HTML.
import { connect } from "/client.js";

const MAX_ROWS = 1000; // older rows leave the table, newest first
const $ = (id) => document.getElementById(id);
const body = document.querySelector("#events tbody");

let client = null;
let subscription = null;
let resumeFrom = null; // the position the subscription had when its connection dropped
let received = 0;

function setState(state, text) {
  const pill = $("state");
  pill.className = "state " + state;
  pill.dataset.state = state;
  pill.textContent = text;
}

function say(text) {
  $("message").textContent = text;
}

function cell(row, value, pre) {
  const td = row.insertCell();
  if (pre) {
    const block = document.createElement("pre");
    block.textContent = value;
    td.appendChild(block);
  } else {
    td.textContent = value;
  }
  return td;
}

function addRow(className, cells) {
  const row = body.insertRow(0);
  row.className = className;
  cells(row);
  while (body.rows.length > MAX_ROWS) body.deleteRow(-1);
  return row;
}

function notice(text, problem) {
  addRow(problem ? "notice problem" : "notice", (row) => {
    cell(row, "");
    const td = cell(row, new Date().toLocaleTimeString() + "  " + text);
    td.colSpan = 5;
  });
}

function pretty(value) {
  return value == null ? "" : JSON.stringify(value, null, 2);
}

/** A change or a snapshot row. */
function showRow(event) {
  received += 1;
  $("counts").textContent = received + (received === 1 ? " event" : " events");
  addRow(event.op, (row) => {
    cell(row, String(received));
    cell(row, event.collection + "." + event.op);
    cell(row, event.timestamp || "");
    cell(row, event.id || "");
    cell(row, pretty(event.data), true);
    const old = cell(row, pretty(event.old), true);
    if (event.op === "update") old.className = "changed";
  });
}

function onEvent(event) {
  switch (event.type) {
    case "change":
    case "snapshot":
      return showRow(event);
    case "snapshot_start":
      return notice("Snapshot of " + event.collection + ": its rows as they are now");
    case "snapshot_end":
      return notice("End of the snapshot (at " + event.id + "); changes after it follow");
    case "resync_required":
      return notice("Resync required for " + event.collection + ": its changes were truncated or left the log", true);
    case "error":
      notice("Error: " + event.error, true);
      return say("The server refused the subscription: " + event.error);
  }
}

function onState(state, detail) {
  if (state === "connecting") {
    setState("connecting", "connecting…");
  } else if (state === "live") {
    setState("live", "live");
    const resumed = resumeFrom ? ", resuming after " + resumeFrom : "";
    notice("Subscribed to " + subscription.collection + resumed);
    say("");
  } else if (state === "reconnecting") {
    reconnecting(detail);
  } else if (state === "closed") {
    closed(detail);
  }
}

function reconnecting(detail) {
  if ($("state").dataset.state !== "reconnecting") {
    resumeFrom = subscription.lastId;
    const why = detail.code ? detail.code + " " + (detail.reason || "no reason given") : detail.reason || "no answer";
    notice("Connection lost (" + why + "); reconnecting" + (resumeFrom ? " to resume after " + resumeFrom : ""));
  }
  const wait = detail.delay === undefined ? "…" : " in " + (detail.delay / 1000).toFixed(1) + " s";
  setState("reconnecting", "reconnecting" + wait);
  if (detail.retryAfter) say("The server is at its connection limit; it asked to wait " + detail.retryAfter + " s.");
}

function closed(detail) {
  client = null;
  buttons();
  if (detail.code === 1000 && detail.reason === "Closed by the client") {
    setState("idle", "not connected");
    return;
  }
  // A token refused twice, or a refusal that retrying cannot help: the client gave up.
  const reason = detail.reason || "no reason given";
  setState("closed", "closed: " + reason);
  say("The server closed the connection (" + detail.code + " " + reason + "). Check the token, then connect again.");
}

function buttons() {
  $("connect").disabled = client !== null;
  $("disconnect").disabled = client === null;
}

function options() {
  const wanted = { operations: [...document.querySelectorAll("#operations input:checked")].map((box) => box.value) };
  const filter = $("filter").value.trim();
  if (filter) wanted.filter = JSON.parse(filter);
  const since = $("since").value.trim();
  if (since) wanted.since = since;
  if ($("snapshot").checked) wanted.snapshot = true;
  return wanted;
}

function start() {
  let wanted;
  try {
    wanted = options();
  } catch (error) {
    say("The filter is not valid JSON: " + error.message);
    return;
  }
  client?.close();
  resumeFrom = null;
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  // The client sends the token as a subprotocol, which keeps it out of URLs and logs.
  client = connect(scheme + "//" + location.host + "/api/v1/realtime/ws", { token: $("token").value.trim() });
  subscription = client.subscribe($("collection").value.trim(), wanted, onEvent);
  client.onState(onState);
  client.onHeartbeat((timestamp) => {
    $("heartbeat").textContent = "heartbeat " + new Date(timestamp).toLocaleTimeString();
  });
  buttons();
}

function claimedCollections(token) {
  // A hint for the collection field only; the server decides what the token may see.
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4)));
    const grant = claims.collections;
    const names = Array.isArray(grant) ? grant : grant && typeof grant === "object" ? Object.keys(grant) : [];
    return names.filter((name) => typeof name === "string" && name !== "*");
  } catch (error) {
    return [];
  }
}

function fillCollections() {
  const list = $("collections");
  list.replaceChildren();
  for (const name of claimedCollections($("token").value.trim())) {
    const option = document.createElement("option");
    option.value = name;
    list.appendChild(option);
  }
}

$("settings").addEventListener("submit", (event) => {
  event.preventDefault();
  start();
});

$("disconnect").addEventListener("click", () => client?.close());

$("clear").addEventListener("click", () => {
  body.replaceChildren();
  received = 0;
  $("counts").textContent = "0 events";
});

$("token").addEventListener("change", fillCollections);

// `pgbridge dev` links here with #token=…&collection=…: fill the form in and connect. The token then
// leaves the address bar (and the history), so that it is not shared along with the page's address.
const given = new URLSearchParams(location.hash.slice(1));
for (const field of ["token", "collection", "filter", "since"]) {
  if (given.has(field)) $(field).value = given.get(field);
}
if (given.has("token")) {
  const rest = new URLSearchParams(given);
  rest.delete("token");
  history.replaceState(history.state, "", location.pathname + location.search + (rest.size ? "#" + rest : ""));
}
fillCollections();
if (given.has("token") && given.has("collection")) start();
