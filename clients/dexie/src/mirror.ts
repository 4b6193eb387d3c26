/**
 * What tabs that do not sync show: the leader's status, sent over a
 * BroadcastChannel at every change and to each tab that opens. A follower
 * keeps its own pending count (it counts the shared queue) and its role.
 */
import type { StatusStore, SyncStatus } from "./status.js";

type Message = { status: Partial<SyncStatus> } | { hello: true } | { sync: true };

export interface Mirror {
  /** Asks the leading tab to sync now. */
  requestSync(): void;
  close(): void;
}

export function mirrorStatus(name: string, status: StatusStore, onSyncRequest: () => void): Mirror {
  if (typeof BroadcastChannel !== "function") return { requestSync() {}, close() {} };
  const channel = new BroadcastChannel(name);
  const post = (message: Message) => channel.postMessage(message);
  const sent = status.subscribe((s) => {
    if (s.leader) post({ status: shared(s) });
  });
  channel.onmessage = ({ data }: MessageEvent<Message | null>) => {
    if (typeof data !== "object" || data === null) return;
    const leader = status.current.leader;
    if ("status" in data && !leader) status.update(data.status);
    if ("hello" in data && leader) post({ status: shared(status.current) });
    if ("sync" in data && leader) onSyncRequest();
  };
  post({ hello: true });
  return {
    requestSync: () => post({ sync: true }),
    close() {
      sent.unsubscribe();
      channel.close();
    },
  };
}

function shared({ state, lastError, lastSyncAt, connected }: SyncStatus): Partial<SyncStatus> {
  return { state, lastError, lastSyncAt, connected };
}
