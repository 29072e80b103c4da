/**
 * The party_sync demo page (served by party_sync at /demo), built on @rpg-bot/party-sync-client.
 *
 * Where the token comes from, first match wins:
 * 1. `?token=<JWT>` in the URL (what `make run` prints);
 * 2. inside Telegram: `Telegram.WebApp.initData`, exchanged at `POST /api/v1/auth/telegram`
 *    for the party and character named by `?party=` and `?character=`;
 * 3. development mode only: a token minted by `POST /api/v1/dev/token` for a picked character
 *    (`?as=<character>` remembers the pick).
 *
 * What a player sees, on every member's screen: the game master's narration as it is written
 * (`#live`, replaced by the final scene text when it arrives), each action being resolved
 * ("Aria made a choice — the game master is deciding…", `#in-flight`), the open vote with the
 * player's own ballot marked (the scene's options are not offered beside it, nor while the
 * party's choice is being settled after it closed), an error once, in words, next to the action
 * that caused it (until that place's next action goes through or the scene or fight moves on),
 * and a story log without the protocol's chatter (the "details" switch shows every event). A
 * link the server refuses says so (and offers the picker in development mode) instead of
 * reconnecting forever, and so does leaving: the page then shows only that; while reconnecting,
 * the party list says it may be out of date.
 */
import {
  ClientClosedError,
  PartySyncClient,
  PartySyncError,
  tokenExpiry,
  type ActionInFlight,
  type ActionResultMessage,
  type Combat,
  type ConnectionChange,
  type ErrorCode,
  type HelloInfo,
  type Member,
  type Narration,
  type OpenVote,
  type PartyEvent,
  type PartySnapshot,
  type Scene,
  type SystemErrorMessage,
  type UnknownPartyEvent,
  type Option,
} from "@rpg-bot/party-sync-client";

/** The close code of an operator's disconnect (docs/protocol.md, close codes). */
const CLOSE_OPERATOR = 4004;

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
const PARTY_ACTOR = "party";

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

function setText(node: Element, text: string): void {
  if (node.textContent !== text) node.textContent = text;
}

function newId(): string {
  const c = globalThis.crypto;
  if (typeof c?.randomUUID === "function") return c.randomUUID();
  const bytes = new Uint8Array(16);
  c.getRandomValues(bytes);
  return [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
}

// --- the log ----------------------------------------------------------------------------------

const log = $("log") as HTMLOListElement;

interface LogOptions {
  seq?: number;
  type?: string;
  kind?: string;
  /** Protocol details a player does not need: shown only with the "details" switch. */
  detail?: boolean;
}

function appendLog(text: string | Node[], options: LogOptions = {}): HTMLLIElement {
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 24;
  const classes = [options.kind ?? "", options.detail ? "detail" : ""].filter(Boolean);
  const item = el("li", { className: classes.join(" ") });
  if (options.seq !== undefined) {
    item.dataset["seq"] = String(options.seq);
    item.append(el("span", { className: "seq", text: `#${options.seq}` }));
  }
  if (options.type !== undefined) item.dataset["type"] = options.type;
  if (typeof text === "string") item.append(text);
  else item.append(...text);
  log.append(item);
  while (log.children.length > LOG_LIMIT) log.firstElementChild?.remove();
  if (atBottom) log.scrollTop = log.scrollHeight;
  return item;
}

/**
 * The log line `item` (the event `seq`) tells what happened before the chapter line just above
 * it (engines publish an action's new scene, then the fight's end): show it above that chapter,
 * and keep the event itself, in seq order, among the details.
 */
function storyBeforeChapter(item: HTMLLIElement, seq: number): void {
  let previous = item.previousElementSibling;
  while (previous !== null && previous.classList.contains("detail")) {
    previous = previous.previousElementSibling;
  }
  if (
    !(previous instanceof HTMLLIElement) ||
    !previous.classList.contains("chapter") ||
    previous.dataset["seq"] !== String(seq - 1)
  ) {
    return;
  }
  const story = item.cloneNode(true) as HTMLLIElement;
  delete story.dataset["seq"];
  story.querySelector(".seq")?.remove();
  story.dataset["story"] = "true";
  previous.before(story);
  item.classList.add("detail");
}

function note(text: string, options: { kind?: string; detail?: boolean } = {}): HTMLLIElement {
  return appendLog(text, {
    kind: `note ${options.kind ?? ""}`.trim(),
    ...(options.detail ? { detail: true } : {}),
  });
}

// --- errors in words --------------------------------------------------------------------------

/** A sentence for a player, for each stable error code (docs/protocol.md, "Error codes"). */
function errorSentence(code: ErrorCode | string, detail?: string): string {
  switch (code) {
    case "action_rejected":
      return `The game master won't allow that${detail ? `: ${detail}` : "."}`;
    case "action_timeout":
      return "The game master did not answer in time. Try again.";
    case "engine_error":
      return "The game master ran into a problem with that. Try again.";
    case "engine_unavailable":
      return "The game master can't be reached right now. Try again in a moment.";
    case "character_busy":
    case "action_in_flight":
      return "You're already doing something: wait for the game master's answer.";
    case "backend_unavailable":
      return "The server is having trouble. Try again in a moment.";
    case "rate_limited":
      return "Too many actions at once: slow down a little.";
    case "forbidden":
      return "Your character can't do that.";
    case "vote_unknown":
      return "That vote is no longer open.";
    case "vote_closed":
      return "The vote has already closed.";
    case "vote_bad_option":
      return "That is not one of the vote's options.";
    case "token_expired":
      return "Your session has expired.";
    case "internal_error":
      return "Something went wrong on the server. Try again.";
    case "bad_json":
    case "bad_message":
    case "unknown_type":
    case "server_only_type":
    case "schema_violation":
    case "message_too_large":
    case "too_deep":
      return "The server did not understand this page's request (a bug in the page).";
    default:
      return "Something went wrong. Try again.";
  }
}

function failureText(error: unknown): { text: string; code: string } {
  if (error instanceof PartySyncError) {
    const detail = error.code === "action_rejected" ? error.error.payload.message : undefined;
    return { text: errorSentence(error.code, detail), code: error.code };
  }
  if (error instanceof ClientClosedError) {
    return { text: "Not sent: this page is no longer connected.", code: "closed" };
  }
  return { text: "Something went wrong. Try again.", code: "unknown" };
}

type Where = "scene" | "combat" | "vote";

/** Show `text` next to the controls it is about (one error per place; the next one replaces it). */
function showError(where: Where, text: string, code: string): void {
  const box = $(`${where}-error`);
  box.textContent = text;
  box.dataset["code"] = code;
  box.hidden = false;
}

function clearError(where: Where): void {
  const box = $(`${where}-error`);
  box.hidden = true;
  box.textContent = "";
  delete box.dataset["code"];
}

// --- tokens -----------------------------------------------------------------------------------

/** A sign-in endpoint refused (4xx, or a 5xx no retry cures): retrying cannot help. */
class SignInRefused extends Error {
  constructor(
    message: string,
    readonly status: number,
    readonly code: string,
  ) {
    super(message);
  }
}

/** 5xx answers of the sign-in endpoints that stay until the operator acts: a server without a
 * bot token answers every Telegram sign-in 503 `telegram_not_configured` (the page retried it
 * for ever behind "Reconnecting…": demo probe). */
const LASTING_SIGN_IN_ERRORS: ReadonlySet<string> = new Set(["telegram_not_configured"]);

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
    if ((response.status >= 400 && response.status < 500) || LASTING_SIGN_IN_ERRORS.has(code)) {
      throw new SignInRefused(message, response.status, code);
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

function signIn(text: string, status = "Not signed in"): void {
  show("signin", true);
  show("log-card", log.children.length > 0);
  $("signin-text").textContent = text;
  setStatus("closed", status);
}

/**
 * Development mode: let the player pick a character. `reload`: start over on a clean page
 * (after a refused link, the page already played with another client).
 */
function pickCharacter(config: DemoConfig, reload = false): Promise<TokenSource> {
  show("signin", true);
  show("log-card", log.querySelector("li:not(.detail)") !== null);
  $("signin-text").textContent =
    `Development mode: pick a character of ${config.party_id} (tokens are minted by this server).`;
  if (!reload) setStatus("idle", "Pick a character");
  return new Promise((resolve) => {
    const choose = (characterId: string, displayName?: string): void => {
      const url = new URL(location.href);
      url.searchParams.delete("token");
      url.searchParams.set("as", characterId);
      if (displayName) url.searchParams.set("name", displayName);
      else url.searchParams.delete("name");
      if (reload) {
        location.replace(url);
        return;
      }
      history.replaceState(null, "", url);
      show("signin", false);
      resolve(devSource(config, characterId, displayName));
    };
    const choices = $("signin-choices");
    choices.replaceChildren(
      ...config.characters.map((c) => {
        const button = el("button", { text: `Play ${c.display_name}` });
        button.dataset["character"] = c.character_id;
        button.addEventListener("click", () => choose(c.character_id));
        return button;
      }),
    );
    const form = $("signin-custom") as HTMLFormElement;
    form.hidden = false;
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const name = (($("signin-name") as HTMLInputElement).value || "").trim().slice(0, 32);
      const id = name.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "");
      if (id && id !== PARTY_ACTOR) choose(id, name);
    });
  });
}

/** Why the page stopped playing for good; then it shows only that (and the picker in dev mode). */
let ended: "link" | "left" | null = null;

/** Hide everything that belongs to playing: the page shows only the sign-in card and the log. */
function stopPlaying(why: "link" | "left"): void {
  ended = why;
  for (const id of ["party", "vote", "vote-result", "combat", "now", "scene", "leave"]) {
    show(id, false);
  }
  show("log-card", log.querySelector("li:not(.detail)") !== null);
  // The story stays readable; the "details" switch is for a page that plays.
  show("log-details-toggle", false);
}

/** The link cannot be used (refused, expired): say so, and offer the picker in development. */
function linkProblem(config: DemoConfig, problem: string, status: string): void {
  stopPlaying("link");
  const box = $("signin-problem");
  box.textContent = problem;
  box.hidden = false;
  $("signin-title").textContent = "This link does not work";
  if (config.dev_mode) {
    void pickCharacter(config, true);
    $("signin-text").textContent =
      `Development mode: pick a character of ${config.party_id} to play with a fresh token.`;
  } else {
    show("signin", true);
    $("signin-text").textContent =
      "Ask the game for a new link, or open the party from the game's Telegram Mini App.";
  }
  setStatus("closed", status);
}

/** This player left the party: say so (leaving is not for good: the same link brings them back). */
function leftParty(config: DemoConfig): void {
  stopPlaying("left");
  show("signin-problem", false);
  $("signin-title").textContent = "You left the party";
  if (config.dev_mode) {
    void pickCharacter(config, true);
    $("signin-text").textContent =
      `You are no longer in ${config.party_id}. Development mode: pick a character to play again.`;
  } else {
    show("signin", true);
    $("signin-choices").replaceChildren();
    $("signin-text").textContent =
      "You are no longer in the party. To come back, open your link to the party again.";
  }
  setStatus("closed", "Left the party");
}

// --- what this page remembers -----------------------------------------------------------------

let client: PartySyncClient | null = null;
/** What to say about one of my own actions: while it is being decided, and in the log. */
interface Said {
  /** "You chose “Row out to the reef”", "You try a skill check". */
  doing: string;
  /** "You chose “Row out to the reef”", "Your skill check" (then " — success"). */
  done: string;
}
/** My own action waiting for its answer (one at a time), with what to say about it. */
let mine: { actionId: string; said: Said; where: Where } | null = null;
/** My own recent actions, for the log and for the error box their answer clears. */
const myActions = new Map<string, { said: Said; where: Where }>();
/** My display name, once the roster has shown it (it stays in the header after I leave). */
let myName: string | null = null;
/**
 * A party vote closed and the party's choice has not led to a scene yet: from vote.finished (or
 * the party's action accepted) until the next scene.update after that action's answer. The
 * scene's options are not offered meanwhile: the engine is settling them.
 */
let partyDeciding = false;
/** The ballot I cast and the server has not confirmed yet. */
let pendingBallot: { voteId: string; option: string } | null = null;
/** Every vote's options, for the labels of its result and of the party's choice. */
const voteOptions = new Map<string, readonly Option[]>();
let clockOffsetMs = 0;
let lastRendered: Partial<
  Record<"members" | "scene" | "combat" | "vote" | "partyState" | "connected" | "deciding", unknown>
> = {};

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
      switch (change.closedReason) {
        case "left":
          return "Left the party";
        case "unauthorized":
          return "Link not valid";
        case "token_expired":
          return "Link expired";
        case "refused":
          return "Refused";
        default:
          return "Offline";
      }
  }
}

function connected(): boolean {
  return client !== null && client.status === "open";
}

function nameOf(state: PartySnapshot | null, characterId: string): string {
  if (characterId === PARTY_ACTOR) return "The party";
  return state?.members.find((m) => m.character_id === characterId)?.display_name ?? characterId;
}

function optionLabel(voteId: string, optionId: string, state: PartySnapshot | null): string {
  return (
    voteOptions.get(voteId)?.find((o) => o.id === optionId)?.label ??
    state?.scene?.options.find((o) => o.id === optionId)?.label ??
    optionId
  );
}

// --- rendering --------------------------------------------------------------------------------

function hpOf(state: PartySnapshot, id: string): string {
  const character = state.partyState?.characters?.[id];
  return character === undefined ? "" : `${character.hp}/${character.max_hp} HP`;
}

/** The roster; while not connected it is marked stale (nobody shows as "online" for sure). */
function renderMembers(state: PartySnapshot): void {
  const live = connected();
  $("party").dataset["stale"] = String(!live);
  show("party-stale", !live && client?.status === "reconnecting");
  $("members").replaceChildren(
    ...state.members.map((m: Member) => {
      const presence = live ? (m.online ? "online" : "offline") : m.online ? "was online" : "offline";
      return el(
        "li",
        { attrs: { "data-character": m.character_id, "data-online": String(m.online) } },
        el("span", { className: "dot", attrs: { "aria-hidden": "true" } }),
        el("span", {
          className: "name",
          text: `${m.display_name}${m.character_id === state.you ? " (you)" : ""}`,
        }),
        el("span", { className: "hint", text: `${presence} ${hpOf(state, m.character_id)}`.trim() }),
      );
    }),
  );
  $("run-status").textContent = state.runStatus.replace(/_/g, " ");
  show("party", true);
}

/** The party's vote is being settled (see `partyDeciding`). */
function partyIsDeciding(state: PartySnapshot): boolean {
  return partyDeciding || state.actionsInFlight.some((a) => a.character_id === PARTY_ACTOR);
}

function iAmActing(state: PartySnapshot | null): boolean {
  if (mine !== null) return true;
  return state?.actionsInFlight.some((a) => a.character_id === state.you) ?? false;
}

function actionsEnabled(): boolean {
  return client !== null && client.status !== "closed" && !iAmActing(client.state);
}

function renderScene(state: PartySnapshot): void {
  const scene: Scene | null = state.scene;
  show("scene", scene !== null);
  if (scene === null) return;
  const section = $("scene");
  if (section.dataset["sceneNumber"] !== String(scene.scene_number)) clearError("scene");
  section.dataset["sceneNumber"] = String(scene.scene_number);
  section.dataset["sceneId"] = scene.scene_id;
  const dc = scene.difficulty !== undefined ? ` · DC ${scene.difficulty}` : "";
  $("scene-meta").textContent = `Scene ${scene.scene_number} · ${scene.kind}${dc}`;
  setText($("scene-title"), scene.title);
  setText($("scene-narration"), scene.narration);
  // While the party votes, its options are the vote's: not offered again here (the engine
  // refuses a choice the vote settles). Once it closed, the party's choice is being settled:
  // none is offered until the scene it leads to arrives.
  const voting = new Set(state.vote?.options.map((o) => o.id) ?? []);
  const deciding = partyIsDeciding(state);
  const options = deciding ? [] : scene.options.filter((o) => !voting.has(o.id));
  const hint = $("scene-vote-hint");
  if (voting.size > 0) {
    hint.textContent = "The party is deciding this by vote: cast your ballot above.";
    hint.dataset["reason"] = "vote";
  } else if (deciding && scene.options.length > 0) {
    hint.textContent = "The party has chosen: the story goes on once the game master settles it.";
    hint.dataset["reason"] = "party";
  }
  hint.hidden = !(voting.size > 0 || (deciding && scene.options.length > 0));
  $("scene-options").replaceChildren(
    ...options.map((option) => {
      const button = el("button", { text: option.label, attrs: { "data-option": option.id } });
      const said = `You chose “${option.label}”`;
      button.addEventListener("click", () =>
        act("choice", { option: option.id }, { doing: said, done: said }, "scene"),
      );
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
  document.body.dataset["fight"] = String(active);
  if (!active || combat === null) {
    clearError("combat");
    return;
  }
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
    const said = `You attack ${enemy.name}`;
    button.addEventListener("click", () =>
      act("combat", { move: "attack", target: enemy.id }, { doing: said, done: said }, "combat"),
    );
    return button;
  });
  const defend = el("button", { className: "secondary", text: "Defend", attrs: { "data-move": "defend" } });
  defend.addEventListener("click", () =>
    act("combat", { move: "defend" }, { doing: "You defend", done: "You defend" }, "combat"),
  );
  $("combat-actions").replaceChildren(...buttons, defend);
  updateButtons();
}

function renderVote(vote: OpenVote | null): void {
  show("vote", vote !== null);
  const section = $("vote");
  if (vote === null) {
    delete section.dataset["voteId"];
    clearError("vote");
    return;
  }
  voteOptions.set(vote.vote_id, vote.options);
  if (section.dataset["voteId"] !== vote.vote_id) clearError("vote");
  section.dataset["voteId"] = vote.vote_id;
  $("vote-question").textContent = vote.question;
  $("vote-count").textContent = `${vote.voted}/${vote.eligible} voted`;
  const sending = pendingBallot?.voteId === vote.vote_id ? pendingBallot.option : null;
  $("vote-options").replaceChildren(
    ...vote.options.map((option) => {
      const mine = vote.your_vote === option.id;
      const button = el(
        "button",
        {
          className: mine ? "mine" : "secondary",
          attrs: { "data-option": option.id, "aria-pressed": String(mine) },
        },
        el("span", { className: "label", text: option.label }),
        el("span", {
          className: "badge",
          text: mine ? "✓ your vote" : sending === option.id ? "sending…" : "",
        }),
        el("span", { className: "tally", text: String(vote.tallies[option.id] ?? 0) }),
      );
      button.addEventListener("click", () => castVote(vote.vote_id, option.id, option.label));
      return button;
    }),
  );
  const chosen = vote.options.find((o) => o.id === vote.your_vote);
  $("vote-mine").textContent = chosen
    ? `You voted for “${chosen.label}”. You can change your vote until it closes.`
    : "You have not voted yet.";
  tickCountdown();
  updateButtons();
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

/** What an action in flight is, in words ("You attack Reefclaw", "Aria made a choice"). */
function describeInFlight(state: PartySnapshot, action: ActionInFlight): string {
  if (action.character_id === state.you) {
    const said = myActions.get(action.action_id)?.said;
    if (said !== undefined) return said.doing;
  }
  if (action.character_id === PARTY_ACTOR) {
    const voteId = action.action_id.startsWith("vote:") ? action.action_id.slice(5) : null;
    const winner = state.lastVoteResult;
    if (voteId !== null && winner !== null && winner.vote_id === voteId) {
      return `The party's choice: “${optionLabel(voteId, winner.winner, state)}”`;
    }
    return "The party's choice";
  }
  // action.accepted says what kind of action it is, not which option or move.
  const you = action.character_id === state.you;
  const who = you ? "You" : nameOf(state, action.character_id);
  switch (action.action_type) {
    case "choice":
      return `${who} made a choice`;
    case "combat":
      return `${who} made a move in the fight`;
    case "skill_check":
      return `${who} tried a skill check`;
  }
}

/** "Happening now": the actions being resolved, and the narration as it is written. */
function renderNow(state: PartySnapshot): void {
  const items: HTMLLIElement[] = [];
  const listed = new Set<string>();
  for (const action of state.actionsInFlight) {
    listed.add(action.action_id);
    items.push(inFlightItem(action.action_id, action.character_id, describeInFlight(state, action), "deciding"));
  }
  if (mine !== null && !listed.has(mine.actionId)) {
    // Sent (or queued while offline), not accepted yet.
    const waiting = connected() ? "sending" : "queued";
    items.push(inFlightItem(mine.actionId, state.you, mine.said.doing, waiting));
  }
  const list = $("in-flight");
  list.replaceChildren(...items);
  renderLive(state.narration);
  show("now", items.length > 0 || state.narration.length > 0);
}

function inFlightItem(
  actionId: string,
  characterId: string,
  what: string,
  phase: "deciding" | "sending" | "queued",
): HTMLLIElement {
  const tail =
    phase === "deciding"
      ? " — the game master is deciding…"
      : phase === "sending"
        ? " — sending…"
        : " — waiting for the connection…";
  return el(
    "li",
    { attrs: { "data-action-id": actionId, "data-character": characterId, "data-phase": phase } },
    el("span", { className: "spinner", attrs: { "aria-hidden": "true" } }),
    el("span", { text: `${what}${tail}` }),
  );
}

/** One paragraph per stream, keyed by stream_id: its text as the client has it (each piece once). */
function renderLive(streams: readonly Narration[]): void {
  const live = $("live");
  const existing = new Map<string, HTMLElement>();
  for (const child of Array.from(live.children)) {
    if (child instanceof HTMLElement && child.dataset["streamId"] !== undefined) {
      existing.set(child.dataset["streamId"], child);
    }
  }
  const nodes = streams.map((stream) => {
    let node = existing.get(stream.streamId);
    if (node === undefined) {
      node = el(
        "p",
        { className: "live-stream", attrs: { "data-stream-id": stream.streamId } },
        el("span", { className: "text" }),
        el("span", { className: "caret", attrs: { "aria-hidden": "true" } }),
      );
    }
    node.dataset["done"] = String(stream.done);
    node.dataset["incomplete"] = String(stream.incomplete);
    if (stream.actionId !== undefined) node.dataset["actionId"] = stream.actionId;
    const text = node.querySelector(".text");
    if (text !== null) setText(text, stream.incomplete && !stream.text ? "…" : stream.text);
    return node;
  });
  // The text area has a capped height (the scene's options stay near on a phone): follow the
  // words as they come, unless the player scrolled up to read.
  const following = live.scrollHeight - live.scrollTop - live.clientHeight < 24;
  live.replaceChildren(...nodes);
  if (following) live.scrollTop = live.scrollHeight;
}

/** Where the action controls are (each a group of buttons, or the button itself). */
const ACTION_GROUPS = ["#scene-options", "#combat-actions", "#skill-check"];

/**
 * The action control the player used: the keyboard focus goes back to it (or to its group's
 * first button, when it was replaced by a new scene's) once the controls are usable again.
 * A button disabled while its action is decided, or replaced, drops the focus to the page: a
 * keyboard or screen-reader player started from the top after every move (UX probe).
 */
let focusBack: { group: string; label: string } | null = null;

function rememberFocus(): void {
  const active = document.activeElement;
  if (!(active instanceof HTMLButtonElement)) return;
  const group = ACTION_GROUPS.find((selector) => active.closest(selector) !== null);
  focusBack = group === undefined ? null : { group, label: active.textContent ?? "" };
}

function restoreFocus(): void {
  if (focusBack === null) return;
  const active = document.activeElement;
  if (active !== null && active !== document.body) {
    // still on the control, or the player went elsewhere (then it is not taken back)
    if (!(active instanceof HTMLButtonElement) || !active.disabled) focusBack = null;
    return;
  }
  const group = document.querySelector(focusBack.group);
  if (group === null) return;
  const buttons =
    group instanceof HTMLButtonElement ? [group] : [...group.querySelectorAll("button")];
  const usable = buttons.filter((b) => !b.disabled && b.offsetParent !== null);
  const label = focusBack.label;
  const target = usable.find((b) => b.textContent === label) ?? usable[0];
  if (target === undefined) return; // not usable yet: tried again at the next update
  focusBack = null;
  target.focus();
}

function updateButtons(): void {
  const enabled = actionsEnabled();
  for (const button of document.querySelectorAll<HTMLButtonElement>(
    "#scene-options button, #skill-check, #combat-actions button",
  )) {
    button.disabled = !enabled;
  }
  const usable = client !== null && client.status !== "closed";
  for (const button of document.querySelectorAll<HTMLButtonElement>("#vote-options button")) {
    button.disabled = !usable;
  }
  restoreFocus();
}

function render(state: PartySnapshot): void {
  // The page stopped playing (a link that does not work, or this player left): it shows that
  // alone, whatever the last state was.
  if (ended !== null) return;
  // Every change makes new objects: re-render only the panels whose data changed.
  const next = {
    members: state.members,
    partyState: state.partyState,
    scene: state.scene,
    combat: state.combat,
    vote: state.vote,
    connected: connected(),
    deciding: partyIsDeciding(state),
  };
  if (
    next.members !== lastRendered.members ||
    next.partyState !== lastRendered.partyState ||
    next.connected !== lastRendered.connected
  ) {
    renderMembers(state);
  }
  if (
    next.scene !== lastRendered.scene ||
    next.vote !== lastRendered.vote ||
    next.deciding !== lastRendered.deciding
  ) {
    renderScene(state);
  }
  if (next.combat !== lastRendered.combat) renderCombat(state.combat);
  if (next.vote !== lastRendered.vote) renderVote(state.vote);
  renderNow(state);
  updateButtons();
  lastRendered = next;
  const me = state.members.find((m) => m.character_id === state.you);
  if (me !== undefined) myName = me.display_name;
  $("title").firstChild!.textContent = `${myName ?? state.you} `;
  $("title-party").textContent = state.partyId;
  show("log-card", true);
  show("leave", true);
}

// --- describing events for the log --------------------------------------------------------------

function resultNodes(state: PartySnapshot | null, message: ActionResultMessage): Node[] {
  const p = message.payload;
  const you = state !== null && p.character_id === state.you;
  const said = myActions.get(p.action_id)?.said;
  let what: string;
  if (p.character_id === PARTY_ACTOR) what = "The party";
  else if (you && said !== undefined) what = said.done;
  else if (you) what = "You";
  else what = nameOf(state, p.character_id);
  const sign = p.roll && p.roll.modifier >= 0 ? "+" : "";
  // The roll once: engines often tell it in their narration already ("… (14+3=17 vs 12): …").
  const told =
    p.roll !== undefined &&
    p.narration !== undefined &&
    new RegExp(`(^|[^0-9])${p.roll.total}\\s*vs\\.?\\s*${p.roll.difficulty}([^0-9]|$)`).test(
      p.narration,
    );
  const roll =
    p.roll && !told
      ? ` (d20 ${p.roll.value}${sign}${p.roll.modifier} = ${p.roll.total} vs ${p.roll.difficulty})`
      : "";
  const outcome = p.outcome.replace(/_/g, " ");
  const nodes: Node[] = [el("strong", { text: `${what} — ${outcome}${roll}` })];
  if (p.narration) nodes.push(el("span", { className: "story", text: p.narration }));
  return nodes;
}

interface Described {
  text: string | Node[];
  detail: boolean;
  kind?: string;
}

/** The scene the story log's last heading names. */
let loggedScene: { id: string; number: number } | null = null;
/** The votes the story log has told of ("The party votes: …"). */
const loggedVotes = new Set<string>();

/** Whether a scene.update opens a chapter of the story log: not the scene its last heading
 * names, restated (after a server restart the snapshot has no scene, and the engine's
 * re-statement of the scene the party was in was logged as a new one: demo probe). */
function newChapter(scene: Scene): boolean {
  const fresh = loggedScene?.id !== scene.scene_id || loggedScene.number !== scene.scene_number;
  loggedScene = { id: scene.scene_id, number: scene.scene_number };
  return fresh;
}

/** Whether a scene.update moves the party to another scene (engines restate the current one). */
function newScene(state: PartySnapshot | null, scene: Scene): boolean {
  return state?.scene?.scene_id !== scene.scene_id || state.sceneNumber !== scene.scene_number;
}

function describe(state: PartySnapshot | null, event: PartyEvent | UnknownPartyEvent): Described {
  if ("unknown" in event) return { text: event.type, detail: true };
  switch (event.type) {
    case "party.join": {
      // My own comings and goings are the status badge's news, not the story's.
      const own = event.payload.character_id === state?.you;
      return { text: `${event.payload.display_name} came online`, detail: own, kind: "presence" };
    }
    case "party.leave": {
      const own = event.payload.character_id === state?.you;
      const who = nameOf(state, event.payload.character_id);
      const text = event.payload.reason === "left" ? `${who} left the party` : `${who} went offline`;
      return { text, detail: own, kind: "presence" };
    }
    case "scene.update":
      return {
        text: `Scene ${event.payload.scene_number}: ${event.payload.title}`,
        detail: !newChapter(event.payload),
        kind: "chapter",
      };
    case "combat.update": {
      const c = event.payload;
      const hp = c.combatants.map((x) => `${x.name} ${x.hp}/${x.max_hp}`).join(", ");
      return c.active
        ? { text: `Combat round ${c.round}: ${hp}`, detail: true }
        : { text: `The fight is over: ${hp}`, detail: false };
    }
    case "party.state":
      return {
        text: `Party ${event.payload.status}, run ${event.payload.run_status.replace(/_/g, " ")}`,
        detail: true,
      };
    case "action.result":
      return { text: resultNodes(state, event), detail: false };
    case "vote.started": {
      const told = loggedVotes.has(event.payload.vote_id);
      loggedVotes.add(event.payload.vote_id);
      return { text: `The party votes: ${event.payload.question}`, detail: told };
    }
    case "vote.update":
      return { text: `Vote: ${event.payload.voted}/${event.payload.eligible} voted`, detail: true };
    case "vote.finished": {
      const p = event.payload;
      const label = optionLabel(p.vote_id, p.winner, state);
      const why = p.reason.replace("_", " ");
      return {
        text: `Vote closed (${why}): ${label} wins${p.tie_broken ? " (tie broken)" : ""}`,
        detail: false,
      };
    }
  }
}

// --- the "vote closed" banner ---------------------------------------------------------------------

/**
 * Shown when a vote closes, while the party's choice is being settled; it goes away with the
 * first scene.update after the answer to the party's choice (the scene it led to), with any new
 * scene, when the party's choice fails, or when another vote opens.
 */
function showVoteBanner(voteId: string, winner: string, text: string): void {
  const banner = $("vote-result");
  banner.textContent = text;
  banner.dataset["winner"] = winner;
  banner.dataset["voteAction"] = `vote:${voteId}`;
  delete banner.dataset["settled"];
  banner.hidden = ended !== null;
}

function hideVoteBanner(): void {
  const banner = $("vote-result");
  banner.hidden = true;
  delete banner.dataset["voteAction"];
  delete banner.dataset["settled"];
}

/** A scene.update (`isNew`: another scene than the current one). */
function onSceneForBanner(isNew: boolean): void {
  const banner = $("vote-result");
  if (banner.dataset["voteAction"] === undefined) return;
  if (isNew || banner.dataset["settled"] === "result") hideVoteBanner();
}

/** An action.result: the party's choice answered, the next scene.update ends the banner. */
function onResultForBanner(actionId: string): void {
  const banner = $("vote-result");
  if (banner.dataset["voteAction"] === actionId) banner.dataset["settled"] = "result";
}

// --- actions ------------------------------------------------------------------------------------

/** Refusals that are the action's final answer: it was not and never will be applied, so trying
 *  again is a new action (a new action_id). Any other retryable refusal (backend_unavailable:
 *  the outcome is unknown) is tried again under the same action_id (``unsettled``). */
const FINAL = new Set(["action_timeout", "engine_error", "engine_unavailable"]);

/** The player's last action whose refusal was not final, with the action_id it went under. */
let unsettled: { key: string; actionId: string } | null = null;

/** An action got its final answer after all (it was applied, or refused for good, through the
 *  party's events): the same click again is a new action. */
function settled(actionId: string): void {
  if (unsettled !== null && unsettled.actionId === actionId) unsettled = null;
}

/** Whether the story log has the result of `actionId` (its event, or its repeat). */
function resultLogged(actionId: string): boolean {
  for (const item of log.querySelectorAll<HTMLElement>("li[data-type='action.result']")) {
    if (item.dataset["action"] === actionId) return true;
  }
  return false;
}

function act(
  type: "choice" | "combat" | "skill_check",
  payload: Record<string, unknown>,
  said: Said,
  where: Where,
): void {
  const c = client;
  if (c === null || !actionsEnabled()) return;
  clearError(where);
  // The same action again after a refusal that is not final (the first send may still be
  // applied): under the same action_id, which the server applies at most once (docs/protocol.md).
  const key = `${type} ${JSON.stringify(payload)}`;
  const actionId = unsettled !== null && unsettled.key === key ? unsettled.actionId : newId();
  unsettled = null;
  rememberFocus();
  mine = { actionId, said, where };
  myActions.set(actionId, { said, where });
  while (myActions.size > 64) myActions.delete(myActions.keys().next().value ?? "");
  if (c.state !== null) render(c.state);
  const sent =
    type === "choice"
      ? c.sendAction("choice", payload as { option: string }, { actionId })
      : c.sendAction(type, payload, { actionId });
  sent
    .then((result) => {
      // A result that came back as a repeat, to this player only (its event came before this
      // page's snapshot: a server restart that lost the party's state) is no event: told here,
      // once (UX probe: the actor's story jumped to the next scene without its outcome).
      if (resultLogged(result.payload.action_id)) return;
      const item = appendLog(resultNodes(client?.state ?? null, result), { type: result.type });
      item.dataset["action"] = result.payload.action_id;
    })
    .catch((error: unknown) => {
      if (error instanceof PartySyncError && error.retryable && !FINAL.has(error.code)) {
        unsettled = { key, actionId };
      }
      const { text, code } = failureText(error);
      showError(where, text, code);
    })
    .finally(() => {
      if (mine?.actionId === actionId) mine = null;
      if (c.state !== null) render(c.state);
    });
}

function castVote(voteId: string, option: string, label: string): void {
  const c = client;
  if (c === null) return;
  clearError("vote");
  pendingBallot = { voteId, option };
  renderVote(c.state?.vote ?? null);
  c.castVote(voteId, option)
    .catch((error: unknown) => {
      const { text, code } = failureText(error);
      const said = `Your vote for “${label}” was not counted: ${text}`;
      if (c.state?.vote?.vote_id === voteId) {
        showError("vote", said, code);
      } else {
        // The vote closed before the ballot reached the server (cast while the link was down):
        // its card is gone, so the story says it (browser probe: the refusal was shown in the
        // hidden card and cleared with it; the player never knew).
        appendLog(said, { kind: "error" });
      }
    })
    .finally(() => {
      if (pendingBallot?.voteId === voteId && pendingBallot.option === option) pendingBallot = null;
      renderVote(c.state?.vote ?? null);
    });
}

// --- start ------------------------------------------------------------------------------------

function numberParam(name: string): number | undefined {
  const value = Number(new URLSearchParams(location.search).get(name));
  return Number.isFinite(value) && value > 0 ? value : undefined;
}

async function start(): Promise<void> {
  const loaded = (await (await fetch("/demo/config.json")).json()) as DemoConfig;
  const source = await tokenSource(loaded);
  if (source === null) return;
  if (source.kind === "url") {
    const expiry = tokenExpiry(source.token);
    if (expiry !== null && expiry <= Date.now()) {
      linkProblem(loaded, "This link has expired.", "Link expired");
      return;
    }
  }
  const url = new URL(loaded.ws_path, location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const backoff: { baseMs?: number; capMs?: number } = {};
  const base = numberParam("backoff_base_ms");
  const cap = numberParam("backoff_cap_ms");
  if (base !== undefined) backoff.baseMs = base;
  if (cap !== undefined) backoff.capMs = cap;
  const c = new PartySyncClient({
    url,
    backoff,
    ...(source.kind === "url" ? { token: source.token } : { getToken: source.getToken }),
  });
  client = c;
  window.partySync = c;
  wire(c, loaded);
  setInterval(tickCountdown, 250);
  $("skill-check").addEventListener("click", () =>
    act("skill_check", {}, { doing: "You try a skill check", done: "Your skill check" }, "scene"),
  );
  const leave = $("leave") as HTMLButtonElement;
  let armed = false;
  leave.addEventListener("click", () => {
    if (!armed) {
      // Honest: the same link brings the player back, so this is not "for good".
      armed = true;
      leave.textContent = "Tap again to leave";
      leave.dataset["armed"] = "true";
      return;
    }
    leave.disabled = true;
    leave.textContent = "Leaving…";
    void client?.leave();
  });
  leave.addEventListener("blur", () => {
    if (!armed || leave.disabled) return;
    armed = false;
    leave.textContent = "Leave the party";
    delete leave.dataset["armed"];
  });
  $("log-details").addEventListener("change", (event) => {
    log.dataset["details"] = String((event.target as HTMLInputElement).checked);
  });
  void c.connect().catch(() => undefined);
}

function closedProblem(change: ConnectionChange): string | null {
  switch (change.closedReason) {
    case "unauthorized":
      return "This link is not valid (or has expired): the server did not accept its token.";
    case "token_expired":
      return "This link has expired.";
    case "refused":
      return change.httpStatus === 403
        ? "The server refused this connection (it may have been blocked by an operator)."
        : `The server refused this connection (HTTP ${change.httpStatus ?? "error"}).`;
    default:
      return null;
  }
}

/** How long a link gets to answer a ping once the browser says it is offline. */
const OFFLINE_CHECK_MS = 3_000;

function wire(c: PartySyncClient, cfg: DemoConfig): void {
  // The network is back: the reconnect is made now, not at the end of its backoff (up to 30 s:
  // demo probe).
  window.addEventListener("online", () => c.reconnectNow());
  // The device lost its network, or the page is shown again (a phone that slept, the Mini App
  // brought back): the link is checked now, not after up to 30 s of silence (its idle ping and
  // pong wait), while the page went on saying "Online" (demo probe).
  window.addEventListener("offline", () => c.checkNow(OFFLINE_CHECK_MS));
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") c.checkNow();
  });
  let online = false;
  let signInTrouble = false; // a failed sign-in was told since the last hello
  let blockedNote: HTMLLIElement | null = null; // an operator's block told since the last hello
  c.on("connection", (change) => {
    setStatus(change.status, connectionText(change));
    if (change.delayMs !== undefined) {
      $("status").title = `next attempt in ${(change.delayMs / 1000).toFixed(1)} s`;
    }
    if (change.status === "reconnecting" && change.code === CLOSE_OPERATOR) {
      // (the client waits a while before it reconnects: it said only "Reconnecting…": demo probe)
      note("An operator disconnected you from the party; reconnecting in a while…", {
        kind: "error",
      });
    } else if (change.status === "reconnecting" && change.httpStatus === 403) {
      // blocked by an operator until a time the server named: the client tries again then
      const seconds = Math.max(1, Math.round((change.delayMs ?? 0) / 1000));
      const when = seconds < 120 ? `${seconds} s` : `${Math.round(seconds / 60)} min`;
      const text = `An operator has blocked you from the party for now; trying again in ${when}…`;
      // One line per block, its time kept current: a second refusal of the same block (a
      // handshake made before the first refusal's answer came, under load) is not a second line.
      if (blockedNote !== null && blockedNote.isConnected) blockedNote.textContent = text;
      else blockedNote = note(text, { kind: "error" });
    } else if (change.status === "reconnecting" && online) {
      const why = change.code !== undefined ? ` (${change.code})` : "";
      note(`Connection lost${why}; reconnecting${change.resume ? " to resume" : ""}…`, {
        detail: true,
      });
    }
    online = change.status === "open";
    if (change.status === "closed") {
      const problem = closedProblem(change);
      if (problem !== null) {
        linkProblem(cfg, problem, connectionText(change));
      } else if (change.closedReason === "left") {
        note("You left the party.");
        leftParty(cfg);
      } else if (change.closedReason === "policy") {
        note("Disconnected by the server: this page sent too much at once.", { kind: "error" });
      }
    }
    if (c.state !== null) render(c.state);
    updateButtons();
  });
  c.on("hello", ({ message, resumed }: HelloInfo) => {
    signInTrouble = false;
    blockedNote = null;
    clockOffsetMs = Date.parse(message.timestamp) - Date.now();
    const p = message.payload;
    const item = note(
      resumed ? `Reconnected: resumed after #${p.resumed_from ?? "?"}` : `Connected: snapshot at #${p.seq}`,
      { detail: true },
    );
    item.dataset["helloSeq"] = String(resumed ? p.resumed_from : p.seq);
    if (!resumed && p.scene !== null) {
      // A story log that starts here starts with the scene the party is in; a snapshot after a
      // time away (a restart, more missed than a resume replays) names a scene the log has not
      // told yet, and the vote it holds (browser probe: both were missing from the story).
      const empty = log.querySelector("li:not(.detail)") === null;
      if (newChapter(p.scene) || empty) {
        note(`Scene ${p.scene.scene_number}: ${p.scene.title}`, { kind: "chapter" });
      }
    }
    if (!resumed && p.vote !== null && !loggedVotes.has(p.vote.vote_id)) {
      loggedVotes.add(p.vote.vote_id);
      note(`The party votes: ${p.vote.question}`);
    }
    if (p.vote !== null) voteOptions.set(p.vote.vote_id, p.vote.options);
    if (!resumed) {
      // A fresh snapshot: what it says is in flight is all there is to wait for.
      lastRendered = {};
      partyDeciding = p.actions_in_flight.some((a) => a.character_id === PARTY_ACTOR);
      const banner = $("vote-result").dataset["voteAction"];
      if (banner !== undefined && !p.actions_in_flight.some((a) => a.action_id === banner)) {
        hideVoteBanner();
      }
    }
  });
  c.on("state", (state) => render(state));
  c.on("event", (event) => {
    const { text, detail, kind } = describe(c.state, event);
    const item = appendLog(text, {
      seq: event.seq,
      type: event.type,
      detail,
      ...(kind !== undefined ? { kind } : {}),
    });
    if ("unknown" in event) return;
    switch (event.type) {
      case "vote.started":
        voteOptions.set(event.payload.vote_id, event.payload.options);
        hideVoteBanner();
        break;
      case "vote.finished": {
        const p = event.payload;
        const label = optionLabel(p.vote_id, p.winner, c.state);
        showVoteBanner(p.vote_id, p.winner, `The party decided: “${label}”.`);
        partyDeciding = true;
        break;
      }
      case "action.result": {
        const p = event.payload;
        item.dataset["action"] = p.action_id;
        settled(p.action_id);
        onResultForBanner(p.action_id);
        // My action went through: an error shown about that place is old news.
        const own = myActions.get(p.action_id);
        if (own !== undefined && c.state !== null && p.character_id === c.state.you) {
          clearError(own.where);
        }
        break;
      }
      case "scene.update": {
        onSceneForBanner(newScene(c.state, event.payload));
        // The party's choice was answered: the scene it led to brings the options back.
        if (!c.state?.actionsInFlight.some((a) => a.character_id === PARTY_ACTOR)) {
          partyDeciding = false;
        }
        // The story moved on: an error about an action here is old news.
        clearError("scene");
        clearError("combat");
        break;
      }
      case "combat.update":
        clearError("scene");
        clearError("combat");
        if (!event.payload.active) {
          // The fight ended with the action before this scene: tell it before the new scene.
          storyBeforeChapter(item, event.seq);
        }
        break;
    }
  });
  c.on("actionAccepted", (message) => {
    if (message.payload.character_id === PARTY_ACTOR) partyDeciding = true;
  });
  c.on("actionFailed", (message) => {
    settled(message.payload.action_id);
    if (message.payload.character_id === PARTY_ACTOR) {
      // The party's choice was refused: the scene stays as it is, its options are open again.
      partyDeciding = false;
      if ($("vote-result").dataset["voteAction"] === message.payload.action_id) hideVoteBanner();
    }
    const state = c.state;
    if (state !== null && message.payload.character_id === state.you) {
      if (myActions.has(message.payload.action_id)) return; // this page's: shown in place
      // The same character's from another tab or device: this page said nothing (demo probe).
      const sentence = errorSentence(message.payload.code);
      note(`Your action from another tab or device was not resolved: ${sentence}`, {
        kind: "error",
      });
      return;
    }
    const who = nameOf(state, message.payload.character_id);
    note(`${who}'s action was not resolved: ${errorSentence(message.payload.code)}`, {
      kind: "error",
    });
  });
  c.on("error", (error: SystemErrorMessage) => {
    const about = error.payload.in_reply_to;
    // An error about my action or ballot is shown once, next to it (the promise rejects).
    if (about.action_id !== undefined || about.type === "vote.cast") return;
    if (error.payload.code === "token_expired") return; // the close that follows says it
    note(errorSentence(error.payload.code), { kind: "error" });
  });
  c.on("resync", (info) => note(`Resync (${info.reason}): taking a fresh snapshot`, { detail: true }));
  c.on("tokenError", (error) => {
    if (error instanceof SignInRefused && c.tokenWanted === null) {
      // Asked only because connections failed (a restart?): the token in hand is still good.
      note("Could not sign in again; going on with the current session…", { detail: true });
      return;
    }
    if (error instanceof SignInRefused) {
      // Refused for good (stale initData, not a member, ...): stop instead of retrying.
      c.close();
      signIn(
        error.code === "telegram_not_configured"
          ? "This server does not take Telegram sign-ins (it is not set up for them): tell the game's operator."
          : error.status === 401
            ? "Sign-in expired or invalid: close and reopen the Mini App."
            : `Sign-in refused (${error.message}).`,
        "Sign-in refused",
      );
      return;
    }
    // Told once in plain sight (the page has nothing else to show until it signs in: demo
    // probe), then only among the details while the retries go on.
    note(`Could not sign in yet (${String(error instanceof Error ? error.message : error)}); trying again…`, {
      kind: "error",
      detail: signInTrouble,
    });
    signInTrouble = true;
  });
}

start().catch((error: unknown) => {
  setStatus("closed", "Error");
  note(`The page could not start: ${String(error)}`, { kind: "error" });
});
