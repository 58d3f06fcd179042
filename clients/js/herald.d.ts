// Type declarations for herald.js, the Herald JavaScript client.

export type State = 'connecting' | 'open' | 'reconnecting' | 'closed';

export interface Welcome {
  type: 'welcome';
  conn: string;
  user: string;
  node: string;
  /** Seconds between the server's Ping frames. */
  heartbeat: number;
}

export interface Message {
  type: 'message';
  /** Server-assigned id (UUIDv7); duplicates are dropped by the client. */
  id: string;
  /** The authenticated sender. */
  from: string;
  /** Direct messages: the recipients. */
  to?: string[];
  /** Room messages: the room. */
  room?: string;
  /** Any JSON value, or the bytes of a binary message (`binary: true`). */
  content: unknown;
  binary?: boolean;
  /** Unix milliseconds when the server accepted the message. */
  ts: number;
  /** Position in the room, or in the recipient's inbox; absent on ephemeral messages. */
  offset?: number;
}

/** Who joined and who left a room during one presence window. Each user is listed once, with
 * where they are at the end of the window. Above the server's `presence.max_members_listed`,
 * `joined` and `left` are absent and only `count` is sent. */
export interface PresenceDiff {
  type: 'presence_diff';
  room: string;
  joined?: string[];
  left?: string[];
  /** Users in the room at the end of the window. */
  count: number;
}

/** A room's member list kept from `members()` and the room's 'presence' events. */
export declare class Roster {
  constructor(members: Members);
  /** null once a diff came with the count only. */
  users: Set<string> | null;
  count: number;
  apply(diff: PresenceDiff): void;
}

export interface Ack {
  type: 'ack';
  ref: string;
  id?: string;
  online?: string[];
  offline?: string[];
  room?: string;
  count?: number;
  offset?: number;
  epoch?: string;
  offsets?: Record<string, number>;
  recovered?: boolean;
}

export interface Members {
  type: 'members';
  ref: string;
  room: string;
  /** Users in the whole room. */
  count: number;
  users: string[];
  /** More users follow: ask again with `after` = this value. */
  next?: string;
}

export interface History {
  type: 'history';
  ref: string;
  room?: string;
  with?: string;
  epoch?: string;
  messages: Message[];
  more: boolean;
}

export declare class HeraldError extends Error {
  /** The server's error code (`not_member`, `forbidden`, …) or `timeout`, `disconnected`, `closed`, `offline`, `queue_full`, `token`, `cancelled` (a join made offline, then left before it went out). */
  code: string;
  ref?: string;
}

export interface ClientOptions {
  /** A token, or a function returning one (called on every connect and on refresh notices). */
  token: string | (() => string | Promise<string>);
  /** A stable id of this device (the rules of a user name: no whitespace, control characters
   * or commas, at most 128 bytes), sent as the `device` query parameter: the server keeps this device's own inbox mark, so it
   * receives every direct message once even when another device of the user acknowledged it.
   * Without it the inbox mark is shared by all of the user's connections. Keep it across
   * restarts (localStorage, a file). */
  device?: string;
  /** A WebSocket constructor, when the platform has no global one. */
  WebSocket?: unknown;
  reconnect?: { initialDelay?: number; maxDelay?: number; factor?: number };
  /** Application-level ping: `interval` ms between pings, dead after `interval + timeout` ms of silence. */
  heartbeat?: { interval?: number; timeout?: number };
  /** Milliseconds before a request without an answer rejects with `timeout`. */
  requestTimeout?: number;
  /** Requests kept while offline. */
  maxQueued?: number;
  /** Message ids remembered for dedupe. */
  dedupeWindow?: number;
}

export interface EventMap {
  state: { state: State; attempt?: number; code?: number; reason?: string; welcome?: Welcome };
  welcome: Welcome;
  message: Message;
  presence: PresenceDiff;
  /** A room rejoined after a reconnect, with the last offset seen and its epoch; emitted before
   * the replayed messages. `recovered: true`: every missed message follows. `false`: they could
   * not all be replayed (the room's stream was recreated, e.g. a new data folder, or the gap
   * was pruned or too long); the newest page follows instead, so rebuild the room's view from
   * it (and `history`). `null`: the room was rejoined without an offset (its first join had no
   * answer yet). */
  rejoined: { room: string; recovered: boolean | null; ack: Ack };
  error: Error;
}

export declare class HeraldClient {
  /** `url`: the server's /ws endpoint, or several nodes' (each reconnect tries the next). */
  constructor(url: string | string[], options: ClientOptions);
  /** The URL in use, or to be tried next. */
  readonly url: string;
  readonly state: State;
  readonly welcome: Welcome | null;
  on<K extends keyof EventMap>(event: K, listener: (payload: EventMap[K]) => void): () => void;
  off<K extends keyof EventMap>(event: K, listener: (payload: EventMap[K]) => void): void;
  connect(): Promise<Welcome>;
  close(): void;
  /** Cut off by a lost connection before its ack, it is sent again with the same id after the
   * reconnect, and the server answers that retry with the first attempt's ack (stored once). */
  send(to: string | string[], content: unknown): Promise<Ack>;
  /** `since`: replay the messages after this offset, of the stream of `epoch` (from an ack or
   * `history`; without it the server cannot tell a recreated stream). Rejoins after a reconnect
   * send both by themselves. Made offline (or while the room's join is in flight), it sends
   * nothing of its own: it resolves with the answer to the room's one join after the reconnect,
   * whose own position wins over `since` for a room joined before. */
  join(room: string, options?: { since?: number; epoch?: string }): Promise<Ack>;
  /** Later reconnects no longer rejoin the room. Made offline for a room joined (or to be
   * joined), it sends nothing and resolves at once with an ack without `count`: the server
   * dropped the old connection's rooms with it. */
  leave(room: string): Promise<Ack>;
  /** A stored publish (not `persist: false`) cut off by a lost connection is retried like `send`. */
  publish(room: string, content: unknown, options?: { echo?: boolean; persist?: boolean }): Promise<Ack>;
  broadcast(content: unknown): Promise<Ack>;
  /** Every user in the room (all pages). */
  members(room: string): Promise<Members>;
  /** One page of the room's users, sorted: those after `after`, at most `limit`. */
  membersPage(room: string, page?: { after?: string; limit?: number }): Promise<Members>;
  history(query: { room?: string; with?: string; before?: number; limit?: number }): Promise<History>;
  ping(): Promise<{ type: 'pong'; ref: string }>;
}
