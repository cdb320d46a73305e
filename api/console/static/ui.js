// Small pieces every page uses: formatting, a dialog, status badges, a loader hook.
import { html, useEffect, useLayoutEffect, useRef, useState, useCallback } from "./vendor/preact-htm.js";

// -- trigger times: the ONE place that knows the unit of startTime/stopTime on /v1 ------------
// Unix seconds, as ZStack's (issue 19): one unit in the whole product.
export const TRIGGER_TIME_UNIT_MS = 1000;
export const triggerTimeToDate = (value) => (value === null || value === undefined ? null : new Date(value * TRIGGER_TIME_UNIT_MS));
export const dateToTriggerTime = (date) => Math.floor(date.getTime() / TRIGGER_TIME_UNIT_MS);

export function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let value = Number(bytes);
  let unit = 0;
  while (Math.abs(value) >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}

export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

export function parseDate(value) {
  if (!value) return null;
  // the embedded SQLite catalog answers without the Z: the API's dates are always UTC
  return new Date(/[zZ]|[+-]\d\d:\d\d$/.test(value) ? value : `${value}Z`);
}

// one formatter for every date: toLocaleString(locale, options) builds a new one per call,
// about a millisecond each, which a 1,000-row table pays on every render
const DATE_FORMAT = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });

export function formatDate(value) {
  const date = value instanceof Date ? value : parseDate(value);
  if (!date || Number.isNaN(date.getTime())) return "–";
  return DATE_FORMAT.format(date);
}

export function age(value) {
  const date = parseDate(value);
  return date ? formatDuration((Date.now() - date.getTime()) / 1000) : "–";
}

export const short = (uuid) => (uuid ? uuid.slice(0, 8) : "–");

const STATUS = {
  ok: ["ok", "OK"],
  overdue: ["warn", "Overdue"],
  failed: ["bad", "Failed"],
  none: ["none", "No backup"],
  Ready: ["ok", "Ready"],
  Creating: ["warn", "Creating"],
  Failed: ["bad", "Failed"],
  Corrupted: ["bad", "Corrupted"],
  Connected: ["ok", "Connected"],
  Disconnected: ["bad", "Disconnected"],
  Enabled: ["ok", "Enabled"],
  Disabled: ["none", "Disabled"],
  Running: ["warn", "Running"],
  Succeeded: ["ok", "Succeeded"],
};

export function Badge({ value, label }) {
  const [kind, text] = STATUS[value] || ["none", value || "–"];
  return html`<span class="badge ${kind}">${label || text}</span>`;
}

export function ErrorBox({ error }) {
  if (!error) return null;
  return html`<p class="error" role="alert">${error.code ? html`<strong>${error.code}</strong>: ` : ""}${error.message}</p>`;
}

/** Runs loader() now and whenever deps change; {data, error, loading, reload}. */
export function useLoad(loader, deps = [], everyMs = 0) {
  const [state, setState] = useState({ data: null, error: null, loading: true });
  const generation = useRef(0);
  const reload = useCallback(async () => {
    const mine = ++generation.current;
    try {
      const data = await loader();
      if (mine === generation.current) setState({ data, error: null, loading: false });
    } catch (error) {
      if (mine === generation.current) setState((old) => ({ data: old.data, error, loading: false }));
    }
  }, deps);
  useEffect(() => {
    reload();
    if (!everyMs) return undefined;
    const timer = setInterval(reload, everyMs);
    return () => clearInterval(timer);
  }, [reload]);
  return { ...state, reload };
}

/** A modal dialog (the browser's <dialog>: Escape closes it, focus stays inside). */
export function Modal({ title, onClose, children }) {
  const ref = useRef(null);
  // opened in the same task as the render (a layout effect), not after the next paint: a key
  // pressed or a click made right after the dialog appears in the DOM reaches the open dialog
  useLayoutEffect(() => {
    const dialog = ref.current;
    if (dialog && !dialog.open) dialog.showModal();
    const first = dialog && dialog.querySelector("input, select, textarea, button.primary, button.danger");
    if (first) first.focus();
  }, []);
  return html`<dialog ref=${ref} aria-label=${title} onClose=${onClose} onCancel=${onClose}>
    <h2>${title}</h2>
    ${children}
  </dialog>`;
}

/** A form in a dialog that calls submit(values) and shows the API's error if it fails. */
export function FormDialog({ title, submitLabel = "OK", danger = false, onClose, onSubmit, children }) {
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const submit = async (event) => {
    event.preventDefault();
    setBusy(true);
    setError(null);
    try {
      const values = Object.fromEntries(new FormData(event.target).entries());
      const keep = await onSubmit(values, event.target);
      if (keep !== "keep") onClose();
    } catch (failure) {
      setError(failure);
    } finally {
      setBusy(false);
    }
  };
  return html`<${Modal} title=${title} onClose=${onClose}>
    <form class="stack" onSubmit=${submit}>
      ${children}
      <${ErrorBox} error=${error} />
      <div class="actions">
        <button type="submit" class=${danger ? "danger" : "primary"} disabled=${busy}>${submitLabel}</button>
        <button type="button" onClick=${onClose}>Cancel</button>
      </div>
    </form>
  <//>`;
}

export function Progress({ value, label }) {
  return html`<progress max="100" value=${value} aria-label=${label || "progress"}>${value}%</progress> <span>${value}%</span>`;
}

export function StorageOptions({ storages, includeDefault = true, exclude = [] }) {
  return html`${includeDefault ? html`<option value="">default (the master)</option>` : null}
    ${storages
      .filter((s) => !exclude.includes(s.uuid))
      .map((s) => html`<option value=${s.uuid}>${s.name} (${s.type}${s.type === "ImageStore" ? `, ${s.role}` : ""})</option>`)}`;
}

/** Non-empty form values only: the API takes defaults for what is left out. */
export function filled(values) {
  return Object.fromEntries(Object.entries(values).filter(([, v]) => v !== "" && v !== undefined && v !== null));
}

/** Runs an action (a function calling the API), then reload(); {act, failure, message}:
 * the API's error if it failed, what the action returned (a line for the person) if it did. */
export function useAct(reload) {
  const [state, setState] = useState({ failure: null, message: null });
  const act = async (work) => {
    setState({ failure: null, message: null });
    try {
      const note = await work();
      setState({ failure: null, message: typeof note === "string" ? note : null });
      reload();
    } catch (failure) {
      setState({ failure, message: null });
    }
  };
  return { act, ...state, setMessage: (message) => setState({ failure: null, message }) };
}
