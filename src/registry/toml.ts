// The part of TOML that registries.conf files use: comments, `[table]` and `[[array]]` headers
// (dotted, bare or quoted keys), `key = value` (dotted keys too) with strings (basic, with
// escapes, and literal), booleans, integers, and arrays of those, on one line or several.
// Multi-line strings, inline tables, floats and dates are refused with the line they are on:
// registries.conf has none, and a value half understood is worse than an error.
import { ImageError } from '../errors.js'

export type TomlValue = string | number | boolean | TomlValue[] | TomlTable
export interface TomlTable {
  [key: string]: TomlValue
}

/** Parses `text`; `file` names it in errors (`REGISTRIES_CONF_INVALID`). */
export function parseToml(text: string, file: string): TomlTable {
  const root: TomlTable = {}
  let current = root
  let i = 0
  let line = 1
  const fail = (why: string): never => {
    throw new ImageError('REGISTRIES_CONF_INVALID', `${file}:${line}: ${why}`)
  }
  const peek = () => text[i]
  const skipBlank = (newlines: boolean) => {
    for (;;) {
      const c = text[i]
      if (c === ' ' || c === '\t' || c === '\r') i++
      else if (c === '\n' && newlines) {
        i++
        line++
      } else if (c === '#') {
        while (i < text.length && text[i] !== '\n') i++
      } else return
    }
  }
  const endOfLine = () => {
    skipBlank(false)
    if (i < text.length && text[i] !== '\n') fail(`unexpected ${JSON.stringify(text.slice(i, i + 10))}`)
  }
  const key = (): string => {
    skipBlank(false)
    const c = peek()
    if (c === '"' || c === "'") return str()
    const m = /[A-Za-z0-9_-]+/y
    m.lastIndex = i
    const found = m.exec(text)
    if (!found) fail('a key was expected')
    i = m.lastIndex
    return found![0]
  }
  const dotted = (): string[] => {
    const parts = [key()]
    for (;;) {
      skipBlank(false)
      if (peek() !== '.') return parts
      i++
      parts.push(key())
    }
  }
  const str = (): string => {
    const quote = text[i]
    if (text.startsWith(quote.repeat(3), i)) fail('multi-line strings are not supported')
    i++
    let out = ''
    for (;;) {
      if (i >= text.length || text[i] === '\n') fail('unterminated string')
      const c = text[i++]
      if (c === quote) return out
      if (c === '\\' && quote === '"') {
        const e = text[i++]
        const simple: Record<string, string> = { b: '\b', t: '\t', n: '\n', f: '\f', r: '\r', '"': '"', '\\': '\\' }
        if (e in simple) out += simple[e]
        else if (e === 'u' || e === 'U') {
          const n = e === 'u' ? 4 : 8
          const hex = text.slice(i, i + n)
          if (!/^[0-9A-Fa-f]+$/.test(hex) || hex.length !== n) fail('bad unicode escape')
          out += String.fromCodePoint(parseInt(hex, 16))
          i += n
        } else fail(`bad escape \\${e}`)
      } else out += c
    }
  }
  const value = (): TomlValue => {
    skipBlank(false)
    const c = peek()
    if (c === '"' || c === "'") return str()
    if (c === '[') {
      i++
      const items: TomlValue[] = []
      for (;;) {
        skipBlank(true)
        if (peek() === ']') {
          i++
          return items
        }
        items.push(value())
        skipBlank(true)
        if (peek() === ',') i++
        else if (peek() !== ']') fail('"," or "]" expected in an array')
      }
    }
    if (c === '{') fail('inline tables are not supported')
    const m = /(true|false|[+-]?\d[\d_]*)(?=[\s,\]#]|$)/y
    m.lastIndex = i
    const found = m.exec(text)
    if (!found) fail(`unsupported value ${JSON.stringify(text.slice(i, i + 20))}`)
    i = m.lastIndex
    if (found![1] === 'true') return true
    if (found![1] === 'false') return false
    return Number(found![1].replace(/_/g, ''))
  }
  /** The table at `path` from `root`, made as needed; the last element of an array of tables. */
  const table = (path: string[], from: TomlTable): TomlTable => {
    let t = from
    for (const k of path) {
      let next = t[k]
      if (next === undefined) next = t[k] = {}
      if (Array.isArray(next)) next = next[next.length - 1]
      if (typeof next !== 'object' || next === null || Array.isArray(next)) fail(`${k} is not a table`)
      t = next as TomlTable
    }
    return t
  }

  for (;;) {
    skipBlank(true)
    if (i >= text.length) return root
    if (peek() === '[') {
      const array = text[i + 1] === '['
      i += array ? 2 : 1
      const path = dotted()
      skipBlank(false)
      if (!text.startsWith(array ? ']]' : ']', i)) fail('"]" expected')
      i += array ? 2 : 1
      endOfLine()
      const parent = table(path.slice(0, -1), root)
      const last = path[path.length - 1]
      if (array) {
        const list = (parent[last] ??= [])
        if (!Array.isArray(list)) fail(`${path.join('.')} is not an array of tables`)
        const t: TomlTable = {}
        ;(list as TomlValue[]).push(t)
        current = t
      } else {
        current = table(path, root)
      }
      continue
    }
    const path = dotted()
    skipBlank(false)
    if (peek() !== '=') fail('"=" expected')
    i++
    const v = value()
    endOfLine()
    const target = table(path.slice(0, -1), current)
    const last = path[path.length - 1]
    if (last in target) fail(`${path.join('.')} is defined twice`)
    target[last] = v
  }
}
