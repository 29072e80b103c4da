/**
 * The party_sync admin page (served by party_sync at /admin), on the admin API (/api/v1).
 *
 * The API key is typed once and kept in sessionStorage (this tab only, gone when it closes); it
 * is sent only to this origin (the page's CSP allows no other). The page lists nodes and parties
 * (refreshed every few seconds), shows one party's presence and actions, follows its events by
 * polling `GET /api/v1/parties/{id}/events?after_seq=` (the simplest robust way: nothing to
 * reconnect, the history's epoch tells when to start again), and disconnects a character.
 */

interface Node {
  node_id: string;
  version: string;
  connections: number;
  started_at: number;
  seen_at: number;
  self: boolean;
}

interface PartySummary {
  party_id: string;
  campaign_run_id: string | null;
  epoch: string;
  last_seq: number;
  members: { online: number; total: number };
  vote: { vote_id: string } | null;
  actions_in_flight: number;
}

interface Connection {
  connection_id: string;
  node_id: string | null;
  expires_at: number;
}

interface Presence {
  character_id: string;
  display_name: string | null;
  online: boolean;
  connections: Connection[];
  nodes: string[];
}

interface PartyDetail {
  party_id: string;
  campaign_run_id: string | null;
  epoch: string;
  last_seq: number;
  presence: Presence[];
  hello: { status: string; run_status: string; scene_number: number };
  actions_in_flight: Array<{ action_id: string; character_id: string; age_seconds: number }>;
}

interface Envelope {
  seq: number;
  type: string;
  timestamp: string;
  trace_id: string;
  payload: Record<string, unknown>;
}

interface HeldEvents {
  epoch: string;
  last_seq: number;
  next_after_seq: number;
  events: Envelope[];
}

const KEY_STORAGE = "party_sync_admin_key";
const REFRESH_MS = 3000;
const FOLLOW_MS = 1000;
const EVENTS_SHOWN = 300;

class Unauthorized extends Error {}

function $(id: string): HTMLElement {
  const element = document.getElementById(id);
  if (element === null) throw new Error(`#${id} missing`);
  return element;
}

function el(tag: string, text?: string, attrs: Record<string, string> = {}): HTMLElement {
  const element = document.createElement(tag);
  if (text !== undefined) element.textContent = text;
  for (const [name, value] of Object.entries(attrs)) element.setAttribute(name, value);
  return element;
}

function when(seconds: number): string {
  return new Date(seconds * 1000).toLocaleString();
}

function setStatus(status: string, text: string): void {
  document.body.dataset["status"] = status;
  $("status").textContent = text;
}

// --- the API ----------------------------------------------------------------------------------

function apiKey(): string | null {
  return sessionStorage.getItem(KEY_STORAGE);
}

async function api<T>(path: string, method = "GET"): Promise<T> {
  const response = await fetch(path, {
    method,
    headers: { Authorization: `Bearer ${apiKey() ?? ""}` },
    cache: "no-store",
  });
  if (response.status === 401) throw new Unauthorized("wrong API key");
  const body: unknown = await response.json();
  if (!response.ok) {
    const detail = (body as { detail?: string }).detail ?? response.statusText;
    throw new Error(`${response.status}: ${detail}`);
  }
  return body as T;
}

// --- state ------------------------------------------------------------------------------------

let selected: string | null = null;
let followEpoch: string | null = null;
let afterSeq = 0;
let cursor: string | null = null; // the page of parties shown (null: the first)
let nextCursor: string | null = null;
let timers: number[] = [];

function lock(message?: string): void {
  sessionStorage.removeItem(KEY_STORAGE);
  for (const timer of timers) clearInterval(timer);
  timers = [];
  $("panels").hidden = true;
  $("unlock").hidden = false;
  $("forget").hidden = true;
  const error = $("key-error");
  error.hidden = message === undefined;
  error.textContent = message ?? "";
  setStatus("locked", "Locked");
}

async function guarded(work: () => Promise<void>): Promise<void> {
  try {
    await work();
    if (document.body.dataset["status"] !== "open") setStatus("open", "Connected");
  } catch (error) {
    if (error instanceof Unauthorized) {
      lock("That key was refused: check it and try again.");
    } else {
      setStatus("error", `Error: ${(error as Error).message}`);
    }
  }
}

// --- nodes and parties ------------------------------------------------------------------------

async function refreshNodes(): Promise<void> {
  const { nodes } = await api<{ nodes: Node[] }>("/api/v1/nodes");
  const body = $("nodes");
  body.replaceChildren(
    ...nodes.map((node) => {
      const row = el("tr", undefined, { "data-node": node.node_id });
      const name = node.self ? `${node.node_id} (this one)` : node.node_id;
      row.append(
        el("td", name),
        el("td", node.version),
        el("td", String(node.connections), { "data-connections": String(node.connections) }),
        el("td", when(node.started_at)),
      );
      return row;
    }),
  );
  $("nodes-count").textContent = `(${nodes.length})`;
}

async function refreshParties(): Promise<void> {
  const query = cursor === null ? "" : `&cursor=${encodeURIComponent(cursor)}`;
  const page = await api<{ parties: PartySummary[]; next_cursor: string | null }>(
    `/api/v1/parties?limit=50${query}`,
  );
  nextCursor = page.next_cursor;
  ($("parties-next") as HTMLButtonElement).disabled = nextCursor === null;
  ($("parties-prev") as HTMLButtonElement).disabled = cursor === null;
  $("parties").replaceChildren(
    ...page.parties.map((party) => {
      const row = el("tr", undefined, {
        "data-party": party.party_id,
        "data-selected": String(party.party_id === selected),
      });
      const open = el("button", party.party_id, { type: "button", class: "link" });
      open.addEventListener("click", () => void select(party.party_id));
      const cell = el("td");
      cell.append(open);
      row.append(
        cell,
        el("td", party.campaign_run_id ?? "–"),
        el("td", `${party.members.online}/${party.members.total}`, { "data-online": "" }),
        el("td", String(party.last_seq)),
        el("td", party.vote?.vote_id ?? "–"),
        el("td", String(party.actions_in_flight)),
      );
      return row;
    }),
  );
  $("parties-count").textContent = `(${page.parties.length}${nextCursor ? "+" : ""})`;
}

// --- one party --------------------------------------------------------------------------------

async function select(partyId: string): Promise<void> {
  selected = partyId;
  followEpoch = null;
  afterSeq = 0;
  $("events").replaceChildren();
  $("party-name").textContent = partyId;
  $("party").hidden = false;
  $("party").dataset["party"] = partyId;
  for (const row of $("parties").querySelectorAll<HTMLElement>("tr[data-party]")) {
    row.dataset["selected"] = String(row.dataset["party"] === partyId);
  }
  await guarded(async () => {
    await refreshParty();
    await follow();
  });
}

async function refreshParty(): Promise<void> {
  if (selected === null) return;
  const partyId = selected;
  const party = await api<PartyDetail>(`/api/v1/parties/${encodeURIComponent(partyId)}`);
  if (selected !== partyId) return;
  $("party-meta").textContent =
    `run ${party.campaign_run_id ?? "–"} · epoch ${party.epoch} · seq ${party.last_seq} · ` +
    `${party.hello.status} / ${party.hello.run_status} · scene ${party.hello.scene_number}`;
  $("presence").replaceChildren(
    ...party.presence.map((member) => {
      const item = el("li", undefined, {
        "data-character": member.character_id,
        "data-online": String(member.online),
        "data-connections": String(member.connections.length),
      });
      const nodes = member.nodes.length ? ` on ${member.nodes.join(", ")}` : "";
      item.append(
        el("strong", member.display_name ?? member.character_id),
        el("span", `${member.character_id} · ${member.connections.length} connection(s)${nodes}`, {
          class: "hint",
        }),
      );
      const who = member.display_name ?? member.character_id;
      const button = el("button", "Disconnect", {
        type: "button",
        class: "danger",
        "aria-label": `Disconnect ${who}`,
      });
      button.addEventListener("click", () => void disconnect(partyId, member.character_id));
      item.append(button);
      return item;
    }),
  );
  $("actions").replaceChildren(
    ...party.actions_in_flight.map((action) =>
      el("li", `${action.action_id} · ${action.character_id} · ${action.age_seconds.toFixed(1)} s`),
    ),
  );
}

async function disconnect(partyId: string, characterId: string): Promise<void> {
  const minutes = Number(($("block-minutes") as HTMLInputElement).value) || 0;
  // 0 minutes: may reconnect at once, a block set before lifted too (`until=0`; no `until`
  // would keep it: the page said 0 lets the player back, and the block stayed: admin probe)
  const until = `?until=${minutes > 0 ? Math.floor(Date.now() / 1000 + minutes * 60) : 0}`;
  const path =
    `/api/v1/parties/${encodeURIComponent(partyId)}/members/` +
    `${encodeURIComponent(characterId)}/connections${until}`;
  await guarded(async () => {
    await api(path, "DELETE");
    const blocked = minutes > 0 ? ` (refused for ${minutes} min)` : "";
    setStatus("open", `Disconnected ${characterId}${blocked}`);
    await refreshParty();
  });
}

function describe(event: Envelope): string {
  const p = event.payload;
  const who = typeof p["character_id"] === "string" ? ` ${p["character_id"]}` : "";
  const what =
    typeof p["action_id"] === "string"
      ? ` ${p["action_id"]}`
      : typeof p["title"] === "string"
        ? ` “${p["title"]}”`
        : typeof p["reason"] === "string"
          ? ` (${p["reason"]})`
          : "";
  return `#${event.seq} ${event.type}${who}${what}`;
}

async function follow(): Promise<void> {
  if (selected === null) return;
  const partyId = selected;
  const held = await api<HeldEvents>(
    `/api/v1/parties/${encodeURIComponent(partyId)}/events?after_seq=${afterSeq}&limit=200`,
  );
  if (selected !== partyId) return;
  const list = $("events");
  if (followEpoch !== null && held.epoch !== followEpoch) {
    // The party's history was lost and started again: follow the new one from its start.
    list.append(el("li", `— new epoch ${held.epoch} —`, { "data-epoch": held.epoch }));
    followEpoch = held.epoch;
    afterSeq = 0;
    return;
  }
  followEpoch = held.epoch;
  for (const event of held.events) {
    list.append(el("li", describe(event), { "data-seq": String(event.seq), "data-type": event.type }));
  }
  afterSeq = held.next_after_seq;
  while (list.children.length > EVENTS_SHOWN) list.firstElementChild?.remove();
  if (held.events.length) {
    list.scrollTop = list.scrollHeight;
    await refreshParty(); // presence and actions change with the events: show them now
  }
}

// --- start ------------------------------------------------------------------------------------

function open(): void {
  $("unlock").hidden = true;
  $("panels").hidden = false;
  $("forget").hidden = false;
  setStatus("loading", "Loading…");
  const overview = (): Promise<void> => guarded(async () => {
    await Promise.all([refreshNodes(), refreshParties()]);
  });
  void overview();
  timers.push(window.setInterval(() => void overview(), REFRESH_MS));
  timers.push(window.setInterval(() => void guarded(follow), FOLLOW_MS));
  timers.push(window.setInterval(() => void guarded(refreshParty), REFRESH_MS));
}

function main(): void {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("key") as HTMLInputElement;
    const key = input.value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    input.value = "";
    open();
  });
  $("forget").addEventListener("click", () => lock());
  $("parties-next").addEventListener("click", () => {
    cursor = nextCursor;
    void guarded(refreshParties);
  });
  $("parties-prev").addEventListener("click", () => {
    cursor = null;
    void guarded(refreshParties);
  });
  if (apiKey()) open();
  else lock();
}

main();
