/**
 * The party_sync demo page (served by party_sync at /demo), built on @rpg-bot/party-sync-client.
 *
 * Where the token comes from, first match wins:
 * 1. `?token=<JWT>` in the URL (what `make run` prints);
 * 2. inside Telegram: `Telegram.WebApp.initData`, exchanged at `POST /api/v1/auth/telegram`
 *    for the party and character named by `?party=` and `?character=`;
 * 3. development mode only: a token minted by `POST /api/v1/dev/token` for a picked character
 *    (`?as=<character>` remembers the pick).
 */
import {
  PartySyncClient,
  PartySyncError,
  type ActionResultMessage,
  type Combat,
  type ConnectionChange,
  type HelloInfo,
  type Member,
  type OpenVote,
  type PartyEvent,
  type PartySnapshot,
  type Scene,
  type SystemErrorMessage,
  type UnknownPartyEvent,
} from "@rpg-bot/party-sync-client";

interface DemoConfig {
  dev_mode: boolean;
  ws_path: string;
  party_id: string;
  campaign_run_id: string;
  characters: Array<{ character_id: string; display_name: string }>;
  telegram_auth_path: string;
  dev_token_path: string;
}

interface TelegramWebApp {
  initData: string;
  ready?: () => void;
  expand?: () => void;
}

declare global {
  interface Window {
    Telegram?: { WebApp?: TelegramWebApp };
    partySync?: PartySyncClient;
  }
}

const TELEGRAM_SCRIPT = "https://telegram.org/js/telegram-web-app.js";
const LOG_LIMIT = 500;

// --- DOM helpers ------------------------------------------------------------------------------

function $(id: string): HTMLElement {
  const element = document.getElementById(id);
  if (element === null) throw new Error(`#${id} missing`);
  return element;
}

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  props: { className?: string; text?: string; attrs?: Record<string, string> } = {},
  ...children: Array<Node | string>
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (props.className !== undefined) node.className = props.className;
  if (props.text !== undefined) node.textContent = props.text;
  for (const [name, value] of Object.entries(props.attrs ?? {})) node.setAttribute(name, value);
  node.append(...children);
  return node;
}

function show(id: string, visible: boolean): void {
  $(id).hidden = !visible;
}

// --- the log ----------------------------------------------------------------------------------

const log = $("log") as HTMLOListElement;

function appendLog(text: string, options: { seq?: number; type?: string; kind?: string } = {}): void {
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 24;
  const item = el("li", { className: options.kind ?? "" });
  if (options.seq !== undefined) {
    item.dataset["seq"] = String(options.seq);
    item.append(el("span", { className: "seq", text: `#${options.seq}` }));
  }
  if (options.type !== undefined) item.dataset["type"] = options.type;
  item.append(text);
  log.append(item);
  while (log.children.length > LOG_LIMIT) log.firstElementChild?.remove();
  if (atBottom) log.scrollTop = log.scrollHeight;
}

function note(text: string, kind = "note"): void {
  appendLog(text, { kind });
}

// --- tokens -----------------------------------------------------------------------------------

/** A sign-in endpoint refused (4xx): retrying the same request cannot help. */
class SignInRefused extends Error {
  constructor(
    message: string,
    readonly status: number,
  ) {
    super(message);
  }
}

async function postJson(path: string, body: unknown): Promise<Record<string, unknown>> {
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const data = (await response.json().catch(() => ({}))) as Record<string, unknown>;
  if (!response.ok) {
    const code = typeof data["error"] === "string" ? data["error"] : response.statusText;
    const message = `${path}: ${response.status} ${code}`;
    if (response.status >= 400 && response.status < 500) {
      throw new SignInRefused(message, response.status);
    }
    throw new Error(message);
  }
  return data;
}

function tokenOf(data: Record<string, unknown>): string {
  const token = data["token"];
  if (typeof token !== "string" || token === "") throw new Error("no token in the answer");
  return token;
}

/** Raw initData when the page runs inside Telegram, else null (then nothing is loaded). */
async function telegramInitData(): Promise<string | null> {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("tgWebAppData");
  if (window.Telegram?.WebApp === undefined && fromHash !== null) {
    await loadTelegramScript(); // optional: theme and ready(); harmless if it cannot load
  }
  const webApp = window.Telegram?.WebApp;
  const initData = webApp?.initData || fromHash;
  if (!initData) return null;
  webApp?.ready?.();
  webApp?.expand?.();
  return initData;
}

function loadTelegramScript(): Promise<void> {
  return new Promise((resolve) => {
    const script = document.createElement("script");
    script.src = TELEGRAM_SCRIPT;
    script.async = true;
    const done = (): void => resolve();
    script.addEventListener("load", done);
    script.addEventListener("error", done);
    setTimeout(done, 3000);
    document.head.append(script);
  });
}

type TokenSource =
  | { kind: "url"; token: string }
  | { kind: "telegram" | "dev"; getToken: () => Promise<string>; who: string };

async function tokenSource(config: DemoConfig): Promise<TokenSource | null> {
  const params = new URLSearchParams(location.search);
  const token = params.get("token");
  if (token) return { kind: "url", token };
  const initData = await telegramInitData();
  if (initData !== null) {
    const party = params.get("party");
    const character = params.get("character");
    if (!party || !character) {
      signIn("This Mini App link must name a party and a character (?party=…&character=…).");
      return null;
    }
    return {
      kind: "telegram",
      who: character,
      getToken: async () =>
        tokenOf(
          await postJson(config.telegram_auth_path, {
            init_data: initData,
            party_id: party,
            character_id: character,
          }),
        ),
    };
  }
  if (!config.dev_mode) {
    signIn(
      "Open this page with a connection token (…/demo?token=…), or from the game's Telegram Mini App.",
    );
    return null;
  }
  const picked = params.get("as");
  if (picked) return devSource(config, picked, params.get("name") ?? undefined);
  return pickCharacter(config);
}

function devSource(config: DemoConfig, characterId: string, displayName?: string): TokenSource {
  return {
    kind: "dev",
    who: characterId,
    getToken: async () =>
      tokenOf(
        await postJson(config.dev_token_path, {
          party_id: config.party_id,
          campaign_run_id: config.campaign_run_id,
          character_id: characterId,
          ...(displayName ? { display_name: displayName } : {}),
        }),
      ),
  };
}

function signIn(text: string): void {
  show("signin", true);
  $("signin-text").textContent = text;
  setStatus("closed", "Not signed in");
}

/** Development mode without a token: let the player pick a character. */
function pickCharacter(config: DemoConfig): Promise<TokenSource> {
  show("signin", true);
  $("signin-text").textContent =
    `Development mode: pick a character of ${config.party_id} (tokens are minted by this server).`;
  setStatus("idle", "Pick a character");
  return new Promise((resolve) => {
    const choose = (characterId: string, displayName?: string): void => {
      const url = new URL(location.href);
      url.searchParams.set("as", characterId);
      if (displayName) url.searchParams.set("name", displayName);
      history.replaceState(null, "", url);
      show("signin", false);
      resolve(devSource(config, characterId, displayName));
    };
    const choices = $("signin-choices");
    for (const c of config.characters) {
      const button = el("button", { text: `Play ${c.display_name}` });
      button.dataset["character"] = c.character_id;
      button.addEventListener("click", () => choose(c.character_id));
      choices.append(button);
    }
    const form = $("signin-custom") as HTMLFormElement;
    form.hidden = false;
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const name = (($("signin-name") as HTMLInputElement).value || "").trim().slice(0, 32);
      const id = name.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "");
      if (id && id !== "party") choose(id, name);
    });
  });
}

// --- rendering --------------------------------------------------------------------------------

let client: PartySyncClient | null = null;
let busy = false;
let clockOffsetMs = 0;
let lastRendered: Partial<Record<"members" | "scene" | "combat" | "vote" | "partyState", unknown>> =
  {};

function setStatus(status: string, text: string): void {
  const badge = $("status");
  badge.dataset["status"] = status;
  badge.textContent = text;
  document.body.dataset["status"] = status;
}

function connectionText(change: ConnectionChange): string {
  switch (change.status) {
    case "idle":
      return "Idle";
    case "connecting":
      return "Connecting…";
    case "open":
      return "Online";
    case "reconnecting":
      return "Reconnecting…";
    case "closed":
      return change.closedReason === "left" ? "Left the party" : `Offline (${change.closedReason})`;
  }
}

function hpOf(state: PartySnapshot, id: string): string {
  const character = state.partyState?.characters?.[id];
  return character === undefined ? "" : `${character.hp}/${character.max_hp} HP`;
}

function renderMembers(state: PartySnapshot): void {
  const list = $("members");
  list.replaceChildren(
    ...state.members.map((m: Member) => {
      const item = el(
        "li",
        { attrs: { "data-character": m.character_id, "data-online": String(m.online) } },
        el("span", { className: "dot", attrs: { "aria-hidden": "true" } }),
        el("span", {
          className: "name",
          text: `${m.display_name}${m.character_id === state.you ? " (you)" : ""}`,
        }),
        el("span", { className: "hint", text: `${m.online ? "online" : "offline"} ${hpOf(state, m.character_id)}`.trim() }),
      );
      return item;
    }),
  );
  $("run-status").textContent = state.runStatus.replace(/_/g, " ");
  show("party", true);
}

function actionsEnabled(): boolean {
  return client !== null && client.status !== "closed" && !busy;
}

function renderScene(scene: Scene | null): void {
  show("scene", scene !== null);
  if (scene === null) return;
  const section = $("scene");
  section.dataset["sceneNumber"] = String(scene.scene_number);
  section.dataset["sceneId"] = scene.scene_id;
  const dc = scene.difficulty !== undefined ? ` · DC ${scene.difficulty}` : "";
  $("scene-meta").textContent = `Scene ${scene.scene_number} · ${scene.kind}${dc}`;
  $("scene-title").textContent = scene.title;
  $("scene-narration").textContent = scene.narration;
  $("scene-options").replaceChildren(
    ...scene.options.map((option) => {
      const button = el("button", { text: option.label, attrs: { "data-option": option.id } });
      button.addEventListener("click", () => act("choice", { option: option.id }, option.label));
      return button;
    }),
  );
  show("skill-check", scene.kind !== "ending");
  updateButtons();
}

/** An HP bar's fill (sized through CSSOM: the page's CSP allows no inline style attributes). */
function bar(percent: number): HTMLSpanElement {
  const fill = el("span");
  fill.style.width = `${percent}%`;
  return fill;
}

function renderCombat(combat: Combat | null): void {
  const active = combat !== null && combat.active;
  show("combat", active);
  if (!active || combat === null) return;
  $("combat-round").textContent = `round ${combat.round}`;
  $("combatants").replaceChildren(
    ...combat.combatants.map((c) => {
      const pct = Math.max(0, Math.min(100, Math.round((c.hp / c.max_hp) * 100)));
      return el(
        "li",
        { attrs: { "data-combatant": c.id, "data-side": c.side, "data-hp": String(c.hp) } },
        el(
          "div",
          { className: "label" },
          el("span", { text: c.name }),
          el("span", { className: "hint", text: `${c.hp}/${c.max_hp}` }),
        ),
        el(
          "div",
          {
            className: "hpbar",
            attrs: {
              role: "progressbar",
              "aria-label": `${c.name} hit points`,
              "aria-valuemin": "0",
              "aria-valuemax": String(c.max_hp),
              "aria-valuenow": String(c.hp),
            },
          },
          bar(pct),
        ),
      );
    }),
  );
  const enemies = combat.combatants.filter((c) => c.side === "enemy" && c.hp > 0);
  const buttons = enemies.map((enemy) => {
    const button = el("button", { text: `Attack ${enemy.name}`, attrs: { "data-move": "attack" } });
    button.dataset["target"] = enemy.id;
    button.addEventListener("click", () =>
      act("combat", { move: "attack", target: enemy.id }, `attack ${enemy.name}`),
    );
    return button;
  });
  const defend = el("button", { className: "secondary", text: "Defend", attrs: { "data-move": "defend" } });
  defend.addEventListener("click", () => act("combat", { move: "defend" }, "defend"));
  $("combat-actions").replaceChildren(...buttons, defend);
  updateButtons();
}

function renderVote(vote: OpenVote | null): void {
  show("vote", vote !== null);
  const section = $("vote");
  if (vote === null) {
    delete section.dataset["voteId"];
    return;
  }
  section.dataset["voteId"] = vote.vote_id;
  $("vote-question").textContent = vote.question;
  $("vote-count").textContent = `${vote.voted}/${vote.eligible} voted`;
  $("vote-options").replaceChildren(
    ...vote.options.map((option) => {
      const mine = vote.your_vote === option.id;
      const button = el(
        "button",
        {
          className: mine ? "" : "secondary",
          attrs: { "data-option": option.id, "aria-pressed": String(mine) },
        },
        el("span", { text: option.label }),
        el("span", { className: "tally", text: String(vote.tallies[option.id] ?? 0) }),
      );
      button.addEventListener("click", () => castVote(vote.vote_id, option.id, option.label));
      return button;
    }),
  );
  tickCountdown();
}

function tickCountdown(): void {
  const vote = client?.state?.vote;
  const target = $("vote-countdown");
  if (!vote) return;
  const remaining = Math.max(0, Date.parse(vote.deadline) - (Date.now() + clockOffsetMs));
  const seconds = Math.ceil(remaining / 1000);
  target.textContent = `${Math.floor(seconds / 60)}:${String(seconds % 60).padStart(2, "0")}`;
  target.setAttribute("datetime", vote.deadline);
  $("vote").dataset["remainingS"] = String(seconds);
}

function updateButtons(): void {
  const enabled = actionsEnabled();
  for (const button of document.querySelectorAll<HTMLButtonElement>(
    "#scene-options button, #skill-check, #combat-actions button",
  )) {
    button.disabled = !enabled;
  }
  const connected = client !== null && client.status !== "closed";
  for (const button of document.querySelectorAll<HTMLButtonElement>("#vote-options button")) {
    button.disabled = !connected;
  }
}

function render(state: PartySnapshot): void {
  // Every change makes new objects: re-render only the panels whose data changed.
  const next = {
    members: state.members,
    partyState: state.partyState,
    scene: state.scene,
    combat: state.combat,
    vote: state.vote,
  };
  if (next.members !== lastRendered.members || next.partyState !== lastRendered.partyState) {
    renderMembers(state);
  }
  if (next.scene !== lastRendered.scene) renderScene(state.scene);
  if (next.combat !== lastRendered.combat) renderCombat(state.combat);
  if (next.vote !== lastRendered.vote) renderVote(state.vote);
  lastRendered = next;
  $("title").firstChild!.textContent = `${nameOf(state, state.you)} `;
  $("title-party").textContent = state.partyId;
  show("leave", true);
}

function nameOf(state: PartySnapshot | null, characterId: string): string {
  if (characterId === "party") return "The party";
  return state?.members.find((m) => m.character_id === characterId)?.display_name ?? characterId;
}

// --- describing events for the log --------------------------------------------------------------

function describeResult(state: PartySnapshot | null, message: ActionResultMessage): string {
  const p = message.payload;
  const who = nameOf(state, p.character_id);
  const what = p.action_type.replace("_", " ");
  if (p.narration) return `${who} · ${what} → ${p.outcome}: ${p.narration}`;
  const sign = p.roll && p.roll.modifier >= 0 ? "+" : "";
  const roll = p.roll
    ? ` (d20 ${p.roll.value}${sign}${p.roll.modifier} = ${p.roll.total} vs ${p.roll.difficulty})`
    : "";
  return `${who} · ${what} → ${p.outcome}${roll}`;
}

function describe(state: PartySnapshot | null, event: PartyEvent | UnknownPartyEvent): string {
  if ("unknown" in event) return `${event.type}`;
  switch (event.type) {
    case "party.join":
      return `${event.payload.display_name} came online`;
    case "party.leave": {
      const who = nameOf(state, event.payload.character_id);
      return event.payload.reason === "left" ? `${who} left the party` : `${who} went offline`;
    }
    case "scene.update":
      return `Scene ${event.payload.scene_number}: ${event.payload.title}`;
    case "combat.update": {
      const c = event.payload;
      const hp = c.combatants.map((x) => `${x.name} ${x.hp}/${x.max_hp}`).join(", ");
      return c.active ? `Combat round ${c.round}: ${hp}` : `Combat over: ${hp}`;
    }
    case "party.state":
      return `Party ${event.payload.status}, run ${event.payload.run_status.replace(/_/g, " ")}`;
    case "action.result":
      return describeResult(state, event);
    case "vote.started":
      return `Vote: ${event.payload.question}`;
    case "vote.update":
      return `Vote: ${event.payload.voted}/${event.payload.eligible} voted`;
    case "vote.finished": {
      const p = event.payload;
      const label = state?.scene?.options.find((o) => o.id === p.winner)?.label ?? p.winner;
      return `Vote closed (${p.reason.replace("_", " ")}): ${label} wins${p.tie_broken ? " (tie broken)" : ""}`;
    }
  }
}

// --- actions ------------------------------------------------------------------------------------

function act(
  type: "choice" | "combat" | "skill_check",
  payload: Record<string, unknown>,
  label: string,
): void {
  if (client === null || busy) return;
  busy = true;
  updateButtons();
  note(client.status === "open" ? `You: ${label}…` : `You: ${label} (queued until reconnected)…`);
  const sent =
    type === "choice"
      ? client.sendAction("choice", payload as { option: string })
      : client.sendAction(type, payload);
  sent
    .catch((error: unknown) => {
      const text = error instanceof PartySyncError ? `${error.code}: ${error.error.payload.message}` : String(error);
      note(`Your action failed: ${text}`, "note error");
    })
    .finally(() => {
      busy = false;
      updateButtons();
    });
}

function castVote(voteId: string, option: string, label: string): void {
  if (client === null) return;
  note(`You vote: ${label}`);
  client.castVote(voteId, option).catch((error: unknown) => {
    const text = error instanceof PartySyncError ? error.code : String(error);
    note(`Your vote was refused: ${text}`, "note error");
  });
}

// --- start ------------------------------------------------------------------------------------

function numberParam(name: string): number | undefined {
  const value = Number(new URLSearchParams(location.search).get(name));
  return Number.isFinite(value) && value > 0 ? value : undefined;
}

async function start(): Promise<void> {
  const config = (await (await fetch("/demo/config.json")).json()) as DemoConfig;
  const source = await tokenSource(config);
  if (source === null) return;
  const url = new URL(config.ws_path, location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const backoff: { baseMs?: number; capMs?: number } = {};
  const base = numberParam("backoff_base_ms");
  const cap = numberParam("backoff_cap_ms");
  if (base !== undefined) backoff.baseMs = base;
  if (cap !== undefined) backoff.capMs = cap;
  client = new PartySyncClient({
    url,
    backoff,
    ...(source.kind === "url" ? { token: source.token } : { getToken: source.getToken }),
  });
  window.partySync = client;
  wire(client);
  setInterval(tickCountdown, 250);
  $("skill-check").addEventListener("click", () => act("skill_check", {}, "skill check"));
  let armed = false;
  $("leave").addEventListener("click", () => {
    if (!armed) {
      armed = true;
      $("leave").textContent = "Tap again to leave for good";
      return;
    }
    void client?.leave();
  });
  void client.connect().catch(() => undefined);
}

function wire(c: PartySyncClient): void {
  let online = false;
  c.on("connection", (change) => {
    setStatus(change.status, connectionText(change));
    if (change.delayMs !== undefined) {
      $("status").title = `next attempt in ${(change.delayMs / 1000).toFixed(1)} s`;
    }
    if (change.status === "reconnecting" && online) {
      const why = change.code !== undefined ? ` (${change.code})` : "";
      note(`Connection lost${why}; reconnecting${change.resume ? " to resume" : ""}…`);
    }
    online = change.status === "open";
    if (change.status === "closed") note(`Disconnected: ${change.closedReason}`);
    updateButtons();
  });
  c.on("hello", ({ message, resumed }: HelloInfo) => {
    clockOffsetMs = Date.parse(message.timestamp) - Date.now();
    const p = message.payload;
    const item = resumed
      ? `Reconnected: resumed after #${p.resumed_from ?? "?"}`
      : `Connected: snapshot at #${p.seq}`;
    note(item);
    log.lastElementChild?.setAttribute("data-hello-seq", String(resumed ? p.resumed_from : p.seq));
    if (!resumed) lastRendered = {};
  });
  c.on("state", (state) => render(state));
  c.on("event", (event) => {
    appendLog(describe(c.state, event), { seq: event.seq, type: event.type });
    if (event.type === "vote.finished" && !("unknown" in event)) {
      const banner = $("vote-result");
      banner.textContent = describe(c.state, event);
      banner.dataset["winner"] = event.payload.winner;
      banner.hidden = false;
    } else if (event.type === "vote.started") {
      show("vote-result", false);
    }
  });
  c.on("error", (error: SystemErrorMessage) => {
    if (error.payload.code === "action_in_flight") return; // a re-sent action: still waiting
    note(`Server: ${error.payload.code} — ${error.payload.message}`, "note error");
  });
  c.on("resync", (info) => note(`Resync (${info.reason}): taking a fresh snapshot`));
  c.on("tokenError", (error) => {
    note(`Could not get a token: ${String(error)}`, "note error");
    if (error instanceof SignInRefused) {
      // Refused for good (stale initData, not a member, ...): stop instead of retrying.
      c.close();
      signIn(
        error.status === 401
          ? "Sign-in expired or invalid: close and reopen the Mini App."
          : `Sign-in refused (${error.message}).`,
      );
    }
  });
}

start().catch((error: unknown) => {
  setStatus("closed", "Error");
  note(`The demo could not start: ${String(error)}`, "note error");
});
