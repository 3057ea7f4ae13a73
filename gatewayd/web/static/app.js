// gatewayd dashboard: REST for sessions and chat, SSE for the live event stream.
"use strict";
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("gatewayd-token") || "";
let session = null;
let events = null;

async function api(method, path, body) {
  const resp = await fetch(path, {
    method,
    headers: { "Authorization": `Bearer ${token}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = resp.status === 204 ? null : await resp.json();
  if (!resp.ok) throw new Error(data && data.error ? data.error.message : resp.statusText);
  return data;
}

function text(el, value) { el.textContent = value; return el; }

async function refreshStatus() {
  try {
    const s = await api("GET", "/api/status");
    text($("status"), `${s.provider}/${s.model} · up ${Math.round(s.uptime_seconds)} s · ` +
      `${s.sessions} sessions · ${s.active_runs} running`);
  } catch (e) {
    text($("status"), e.message);
  }
}

async function refreshSessions() {
  const { sessions } = await api("GET", "/api/sessions?limit=100");
  const list = $("sessions");
  list.replaceChildren();
  for (const s of sessions) {
    const li = text(document.createElement("li"), s.title || s.id);
    li.title = `${s.message_count} messages, last ${s.last_activity}`;
    if (s.id === session) li.className = "active";
    li.onclick = () => openSession(s.id);
    list.append(li);
  }
}

function showMessage(role, content) {
  const div = text(document.createElement("div"), content);
  div.className = `msg ${role}`;
  $("messages").append(div);
  div.scrollIntoView();
  return div;
}

async function openSession(id) {
  session = id;
  $("messages").replaceChildren();
  const { messages } = await api("GET", `/api/sessions/${encodeURIComponent(id)}/history`);
  for (const m of messages) showMessage(m.role, m.content);
  refreshSessions();
}

async function send(message) {
  const body = { message };
  if (session) body.session_id = session;
  showMessage("user", message);
  const reply = showMessage("assistant", "…");
  try {
    const result = await api("POST", "/api/chat", body);
    session = result.session_id;
    text(reply, result.response);
  } catch (e) {
    text(reply, `error: ${e.message}`);
  }
  refreshSessions();
}

function showEvent(ev) {
  const li = text(document.createElement("li"), `${ev.id} ${ev.type}` +
    (ev.session_id ? ` ${ev.session_id}` : ""));
  if (ev.type === "approval_requested") {
    li.className = "approval";
    li.append(` ${ev.tool} ${JSON.stringify(ev.input)}`);
    for (const decision of ["approve", "deny"]) {
      const b = text(document.createElement("button"), decision);
      b.onclick = () => api("POST", `/api/approvals/${ev.approval_id}/${decision}`, {})
        .then(() => b.parentElement.remove(), (e) => alert(e.message));
      li.append(b);
    }
  }
  $("events").prepend(li);
  while ($("events").children.length > 200) $("events").lastChild.remove();
}

async function follow() {
  if (events) events.close();
  // a one-time ticket keeps the long-lived token out of the URL
  const { ticket } = await api("POST", "/api/tickets", {});
  events = new EventSource(`/api/events?ticket=${encodeURIComponent(ticket)}`);
  events.onmessage = (m) => showEvent(JSON.parse(m.data));
  const types = ["run_started", "run_complete", "run_error", "run_aborted", "approval_requested",
    "approval_resolved", "session_created", "session_deleted", "cron_fired", "heartbeat_alert"];
  for (const t of types) events.addEventListener(t, (m) => showEvent(JSON.parse(m.data)));
  events.onerror = () => { events.close(); setTimeout(follow, 3000); };
}

async function start() {
  if (!token) return;
  await refreshStatus();
  await refreshSessions();
  follow().catch((e) => text($("status"), e.message));
  setInterval(refreshStatus, 10000);
}

$("login").onsubmit = (e) => {
  e.preventDefault();
  token = $("token").value.trim();
  sessionStorage.setItem("gatewayd-token", token);
  $("token").value = "";
  start();
};
$("chat").onsubmit = (e) => {
  e.preventDefault();
  const message = $("message").value.trim();
  if (message) send(message);
  $("message").value = "";
};
$("message").onkeydown = (e) => {
  if (e.key === "Enter" && e.ctrlKey) $("chat").requestSubmit();
};
$("new-session").onclick = () => { session = null; $("messages").replaceChildren(); refreshSessions(); };
start();
