// The pgbridge inspector: a client of the public realtime protocol, nothing more.
// Row values are untrusted: everything is rendered with textContent, never as HTML.
"use strict";

const MAX_ROWS = 1000; // older rows leave the table, newest first
const $ = (id) => document.getElementById(id);
const body = document.querySelector("#events tbody");

let socket = null;
let wanted = false; // the user asked to be connected: reconnect when the connection drops
let lastId = null; // id of the last event received: what a reconnect resumes from
let retry = 0;
let retryTimer = null;
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
  return value === undefined ? "" : JSON.stringify(value, null, 2);
}

function showEvent(message) {
  received += 1;
  $("counts").textContent = received + (received === 1 ? " event" : " events");
  const operation = message.type.slice(message.type.lastIndexOf(".") + 1);
  addRow(operation, (row) => {
    cell(row, String(received));
    cell(row, message.type);
    cell(row, message.timestamp || "");
    cell(row, message.id || "");
    cell(row, pretty(message.data), true);
    const old = cell(row, pretty(message.old), true);
    if (operation === "update") old.className = "changed";
  });
  if (message.id) lastId = message.id;
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

function subscription() {
  const message = { action: "subscribe", collection: $("collection").value.trim() };
  message.operations = [...document.querySelectorAll("#operations input:checked")].map((box) => box.value);
  const filter = $("filter").value.trim();
  if (filter) message.filter = JSON.parse(filter);
  const since = lastId || $("since").value.trim();
  if (since) message.since = since;
  return message;
}

function open() {
  clearTimeout(retryTimer);
  let message;
  try {
    message = subscription();
  } catch (error) {
    say("The filter is not valid JSON: " + error.message);
    return;
  }
  const token = $("token").value.trim();
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  // The token travels as a subprotocol, which keeps it out of URLs and logs.
  socket = new WebSocket(scheme + "//" + location.host + "/api/v1/realtime/ws", ["bearer", token]);
  const current = socket;
  setState(retry ? "reconnecting" : "connecting", retry ? "reconnecting…" : "connecting…");
  current.onopen = () => {
    current.send(JSON.stringify(message));
  };
  current.onmessage = (event) => {
    let data;
    try {
      data = JSON.parse(event.data);
    } catch (error) {
      notice("A frame that is not JSON: " + String(event.data).slice(0, 200), true);
      return;
    }
    handle(data, message);
  };
  current.onclose = (event) => closed(current, event);
}

function handle(data, message) {
  if (data.error) {
    notice("Error: " + data.error, true);
  } else if (data.type === "subscribed") {
    retry = 0;
    setState("live", "live");
    const resumed = message.since ? ", resuming after " + message.since : "";
    notice("Subscribed to " + data.collection + resumed);
    say("");
  } else if (data.type === "heartbeat") {
    $("heartbeat").textContent = "heartbeat " + new Date(data.timestamp).toLocaleTimeString();
  } else if (data.type === "resync_required") {
    notice("Resync required for " + data.collection + ": changes were truncated or left the change log", true);
    if (data.id) lastId = data.id;
  } else if (typeof data.type === "string" && data.type.includes(".")) {
    showEvent(data);
  }
}

function closed(current, event) {
  if (socket !== current) return;
  socket = null;
  const reason = event.reason || "no reason given";
  if (!wanted) {
    setState("idle", "not connected");
    return;
  }
  // Authentication problems and refused frames do not go away by retrying.
  if (event.code === 1008 || event.code === 1002 || event.code === 1009) {
    wanted = false;
    setState("closed", "closed: " + reason);
    say("The server closed the connection (" + event.code + " " + reason + "). Check the token, then connect again.");
    buttons();
    return;
  }
  retry += 1;
  const delay = Math.min(5000, 250 * 2 ** retry);
  setState("reconnecting", "reconnecting in " + (delay / 1000).toFixed(1) + " s");
  notice("Connection lost (" + event.code + " " + reason + "); reconnecting" + (lastId ? " to resume after " + lastId : ""));
  retryTimer = setTimeout(open, delay);
}

function buttons() {
  $("connect").disabled = wanted;
  $("disconnect").disabled = !wanted;
}

$("settings").addEventListener("submit", (event) => {
  event.preventDefault();
  if (socket) socket.close(1000);
  wanted = true;
  retry = 0;
  lastId = null;
  buttons();
  open();
});

$("disconnect").addEventListener("click", () => {
  wanted = false;
  clearTimeout(retryTimer);
  buttons();
  if (socket) socket.close(1000);
  setState("idle", "not connected");
});

$("clear").addEventListener("click", () => {
  body.replaceChildren();
  received = 0;
  $("counts").textContent = "0 events";
});

$("token").addEventListener("change", fillCollections);

// `pgbridge dev` links here with #token=…&collection=…: fill the form in and connect.
const given = new URLSearchParams(location.hash.slice(1));
for (const field of ["token", "collection", "filter", "since"]) {
  if (given.has(field)) $(field).value = given.get(field);
}
fillCollections();
if (given.has("token") && given.has("collection")) $("connect").click();
