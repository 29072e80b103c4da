/**
 * The party as one client sees it: a snapshot taken from `system.hello`, then kept up to date by
 * applying party events in seq order. Pure functions over immutable values (every change makes a
 * new object), so a UI can compare references to know what changed.
 */
import { narrationOf, settleNarration, withoutAction, type Narration } from "./live.js";
import type {
  ActionInFlight,
  Combat,
  Member,
  PartyEvent,
  PartyState,
  Scene,
  SystemHelloPayload,
  VoteFinishedPayload,
  VoteStartedPayload,
  VoteState,
} from "./types.js";

/** The open vote: the hello's `vote` state, plus the rules from `vote.started` when seen. */
export interface OpenVote extends VoteState {
  tie_rule?: VoteStartedPayload["tie_rule"];
  default_option?: string;
  timeout_s?: number;
}

export interface Limits {
  max_message_bytes: number;
  action_timeout_ms: number;
  heartbeat_ms: number;
  narration_idle_ms: number;
}

export interface PartySnapshot {
  partyId: string;
  campaignRunId: string;
  /** This connection's character. */
  you: string;
  /** Party status (`active`, ...). */
  status: string;
  /** Run status (`pending`, `in_progress`, `finished`, ...). */
  runStatus: string;
  /** The roster, in the order members were first seen. */
  members: readonly Member[];
  sceneNumber: number;
  scene: Scene | null;
  combat: Combat | null;
  partyState: PartyState | null;
  /** The open vote, or null. */
  vote: OpenVote | null;
  /** The last vote that finished while this client watched (null before any). */
  lastVoteResult: VoteFinishedPayload | null;
  /**
   * The party's accepted actions with no final answer yet, oldest first: from the hello, then
   * `action.accepted` adds one, its `action.result` or `action.failed` removes it.
   */
  actionsInFlight: readonly ActionInFlight[];
  /**
   * The live narration streams, in the order they started: the open ones, and the finished ones
   * until their final text arrives (the `scene.update`, or the `action.result` of their action).
   */
  narration: readonly Narration[];
  limits: Limits;
  /** The event history this state counts in, and the last event applied. */
  epoch: string;
  lastSeq: number;
}

export function fromHello(hello: SystemHelloPayload): PartySnapshot {
  return {
    partyId: hello.party_id,
    campaignRunId: hello.campaign_run_id,
    you: hello.you,
    status: hello.status,
    runStatus: hello.run_status,
    members: hello.members.map((m) => ({ ...m })),
    sceneNumber: hello.scene_number,
    scene: hello.scene,
    combat: hello.combat,
    partyState: hello.party_state,
    vote: hello.vote === null ? null : { ...hello.vote },
    lastVoteResult: null,
    actionsInFlight: hello.actions_in_flight.map((a) => ({ ...a })),
    narration: hello.narration.map(narrationOf),
    limits: { ...hello.limits },
    epoch: hello.epoch,
    lastSeq: hello.seq,
  };
}

function upsertMember(members: readonly Member[], member: Member): Member[] {
  const index = members.findIndex((m) => m.character_id === member.character_id);
  if (index < 0) return [...members, member];
  return members.map((m, i) => (i === index ? member : m));
}

/** Apply one party event (already checked to be the next in seq order). */
export function applyEvent(state: PartySnapshot, event: PartyEvent): PartySnapshot {
  const next: PartySnapshot = { ...state, lastSeq: event.seq };
  switch (event.type) {
    case "party.join": {
      const { character_id, display_name } = event.payload;
      next.members = upsertMember(state.members, { character_id, display_name, online: true });
      return next;
    }
    case "party.leave": {
      const { character_id, reason } = event.payload;
      if (reason === "left") {
        next.members = state.members.filter((m) => m.character_id !== character_id);
      } else {
        const current = state.members.find((m) => m.character_id === character_id);
        next.members = upsertMember(state.members, {
          character_id,
          display_name: current?.display_name ?? character_id,
          online: false,
        });
      }
      return next;
    }
    case "party.state": {
      const p = event.payload;
      next.partyState = p;
      next.status = p.status;
      next.runStatus = p.run_status;
      if (p.scene_number !== undefined) next.sceneNumber = p.scene_number;
      return next;
    }
    case "scene.update":
      next.scene = event.payload;
      next.sceneNumber = event.payload.scene_number;
      next.narration = settleNarration(state.narration, { kind: "scene" }).narration;
      return next;
    case "combat.update":
      next.combat = event.payload;
      return next;
    case "vote.started": {
      const p = event.payload;
      const tallies: Record<string, number> = {};
      for (const option of p.options) tallies[option.id] = 0;
      const vote: OpenVote = {
        vote_id: p.vote_id,
        question: p.question,
        options: p.options,
        deadline: p.deadline,
        tallies,
        voted: 0,
        eligible: state.members.filter((m) => m.online).length,
        your_vote: null,
        tie_rule: p.tie_rule,
        timeout_s: p.timeout_s,
      };
      if (p.default_option !== undefined) vote.default_option = p.default_option;
      next.vote = vote;
      return next;
    }
    case "vote.update": {
      const p = event.payload;
      if (state.vote !== null && state.vote.vote_id === p.vote_id) {
        next.vote = { ...state.vote, tallies: p.tallies, voted: p.voted, eligible: p.eligible };
      }
      return next;
    }
    case "vote.finished":
      if (state.vote !== null && state.vote.vote_id === event.payload.vote_id) next.vote = null;
      next.lastVoteResult = event.payload;
      return next;
    case "action.result": {
      const actionId = event.payload.action_id;
      next.actionsInFlight = withoutAction(state.actionsInFlight, actionId);
      next.narration = settleNarration(state.narration, { kind: "result", actionId }).narration;
      return next;
    }
  }
}

/** Record this character's own ballot (confirmed by the vote.update its vote.cast caused). */
export function withOwnBallot(state: PartySnapshot, voteId: string, option: string): PartySnapshot {
  if (state.vote === null || state.vote.vote_id !== voteId) return state;
  return { ...state, vote: { ...state.vote, your_vote: option } };
}
