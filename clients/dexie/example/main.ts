/**
 * A todo list synced by mana-sync: open it in two windows (or two
 * browsers) with tokens of one user and watch them agree. Every write goes
 * to IndexedDB first; the adapter does the rest.
 */
import { Dexie, liveQuery, type Table } from "dexie";

import { syncDexie, syncStores } from "../src/index.js";

interface Todo {
  id: string;
  title: string;
  done: boolean;
  createdAt: string;
}

const params = new URLSearchParams(location.search);
const server = params.get("server") ?? "http://localhost:3050";
const tokenInput = document.querySelector<HTMLInputElement>("#token")!;

// A host page (or a test) may hand over its own token getter; this page
// otherwise uses the token pasted into it.
const hosted = (globalThis as { manaSyncToken?: () => Promise<string> }).manaSyncToken;
const storedToken = () => localStorage.getItem("mana-sync-token") ?? "";

const db = new Dexie(`todo@${server}`) as Dexie & { todos: Table<Todo, string> };
db.version(1).stores({ todos: "id, createdAt", ...syncStores });
const sync = syncDexie(db, {
  url: server,
  appId: "todo",
  tables: ["todos"],
  token: hosted ?? storedToken,
});

/** When syncing last started (for the browser console and the tests). */
let startedAt = 0;

document.querySelector("#server")!.textContent = server;
if (hosted === undefined && storedToken() === "") {
  (document.querySelector("#settings") as HTMLDetailsElement).open = true;
} else {
  start();
}

function start(): void {
  startedAt = Date.now();
  sync.start();
}

document.querySelector("#connect")!.addEventListener("submit", (event) => {
  event.preventDefault();
  localStorage.setItem("mana-sync-token", tokenInput.value.trim());
  (document.querySelector("#settings") as HTMLDetailsElement).open = false;
  void sync.stop().then(start);
});

document.querySelector("#add")!.addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.querySelector<HTMLInputElement>("#title")!;
  const title = input.value.trim();
  if (title === "") return;
  input.value = "";
  void db.todos.add({ id: crypto.randomUUID(), title, done: false, createdAt: new Date().toISOString() });
});

const list = document.querySelector<HTMLUListElement>("#list")!;
liveQuery(() => db.todos.orderBy("createdAt").toArray()).subscribe((todos) => {
  list.replaceChildren(...todos.map(item));
});

function item(todo: Todo): HTMLLIElement {
  const li = document.createElement("li");
  li.className = todo.done ? "done" : "";
  li.dataset.id = todo.id;
  const box = Object.assign(document.createElement("input"), { type: "checkbox", checked: todo.done });
  box.addEventListener("change", () => void db.todos.update(todo.id, { done: box.checked }));
  const title = Object.assign(document.createElement("span"), { textContent: todo.title, title: "double-click to edit" });
  title.addEventListener("dblclick", () => {
    const edited = prompt("Title", todo.title);
    if (edited !== null && edited.trim() !== "") void db.todos.update(todo.id, { title: edited.trim() });
  });
  const remove = Object.assign(document.createElement("button"), { textContent: "✕", title: "delete" });
  remove.addEventListener("click", () => void db.todos.delete(todo.id));
  li.append(box, title, remove);
  return li;
}

const status = document.querySelector<HTMLParagraphElement>("#status")!;
sync.status.subscribe((s) => {
  status.dataset.state = s.state;
  status.textContent =
    `${s.state}${s.connected ? ", live" : ""}${s.leader ? "" : " (another tab syncs)"}` +
    ` · ${s.pending} pending` +
    (s.lastError ? ` · last error: ${s.lastError}` : "");
});

// For the browser console (and the browser tests): the database, the
// engine, Dexie's liveQuery and when syncing started.
Object.assign(globalThis, {
  mana: {
    db,
    sync,
    liveQuery,
    get startedAt() {
      return startedAt;
    },
  },
});
