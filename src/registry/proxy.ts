// Proxies from the environment, with the rules skopeo and every other Go program follow (Go's
// http.ProxyFromEnvironment): HTTPS_PROXY for https URLs, HTTP_PROXY for http ones (upper case
// first, then lower case), NO_PROXY for the exceptions, and never a proxy for localhost or a
// loopback address. A proxy without a scheme is taken as http://. Plain-HTTP targets are asked
// through the proxy in absolute form; https targets through a CONNECT tunnel, with TLS to the
// registry end to end (client.ts).
import { isIP } from 'node:net'
import { ImageError } from '../errors.js'

/** The proxy settings of an environment, read once per client. */
export interface ProxyConfig {
  http?: URL
  https?: URL
  /** NO_PROXY, as given. */
  noProxy: string
}

function firstSet(env: NodeJS.ProcessEnv, ...names: string[]): string | undefined {
  for (const n of names) if (env[n]) return env[n]
  return undefined
}

/** Parses a proxy setting; fails `UNSUPPORTED` for a scheme other than http and https. */
function proxyUrl(value: string | undefined, variable: string): URL | undefined {
  if (!value) return undefined
  let url: URL | undefined
  try {
    url = new URL(value)
  } catch {
    // taken as a host[:port]
  }
  if (!url || !/^[a-z][a-z0-9+.-]*:$/.test(url.protocol) || !url.host) {
    try {
      url = new URL(`http://${value}`)
    } catch {
      throw new ImageError('UNSUPPORTED', `${variable}=${JSON.stringify(value)} is not a proxy URL`)
    }
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') {
    throw new ImageError('UNSUPPORTED', `${variable}: ${url.protocol.slice(0, -1)} proxies are not supported (http and https are)`)
  }
  return url
}

/**
 * The proxy settings in `env`: HTTP_PROXY (ignored when REQUEST_METHOD is set, as in Go, so a
 * CGI request's `Proxy:` header cannot choose one), HTTPS_PROXY and NO_PROXY, upper case first.
 */
export function proxyConfig(env: NodeJS.ProcessEnv = process.env): ProxyConfig {
  const cgi = env.REQUEST_METHOD !== undefined && env.REQUEST_METHOD !== ''
  return {
    http: cgi ? undefined : proxyUrl(firstSet(env, 'HTTP_PROXY', 'http_proxy'), 'HTTP_PROXY'),
    https: proxyUrl(firstSet(env, 'HTTPS_PROXY', 'https_proxy'), 'HTTPS_PROXY'),
    noProxy: firstSet(env, 'NO_PROXY', 'no_proxy') ?? '',
  }
}

/** The proxy to reach `url` through, or undefined to connect directly. */
export function proxyFor(url: URL, config: ProxyConfig): URL | undefined {
  const proxy = url.protocol === 'https:' ? config.https : url.protocol === 'http:' ? config.http : undefined
  if (!proxy) return undefined
  const port = url.port || (url.protocol === 'https:' ? '443' : '80')
  return bypassed(url.hostname, port, config.noProxy) ? undefined : proxy
}

/** True when `host` (a URL hostname: IPv6 in brackets) is not to be proxied. */
export function bypassed(hostname: string, port: string, noProxy: string): boolean {
  const host = hostname.toLowerCase().replace(/^\[(.*)\]$/, '$1')
  if (isLoopbackHost(host)) return true
  for (const raw of noProxy.split(',')) {
    let entry = raw.trim().toLowerCase()
    if (entry === '') continue
    if (entry === '*') return true
    if (entry.includes('/')) {
      if (isIP(host) && inCidr(host, entry)) return true
      continue
    }
    // host:port, [v6]:port, v6, v4, or a domain
    let entryPort = ''
    const bracketed = /^\[(.*)\](?::(\d+))?$/.exec(entry)
    if (bracketed) {
      entry = bracketed[1]
      entryPort = bracketed[2] ?? ''
    } else if (isIP(entry) !== 6) {
      const colon = entry.lastIndexOf(':')
      if (colon > 0 && /^\d+$/.test(entry.slice(colon + 1))) {
        entryPort = entry.slice(colon + 1)
        entry = entry.slice(0, colon)
      }
    }
    if (entryPort && entryPort !== port) continue
    if (isIP(entry)) {
      if (isIP(host) && sameIp(entry, host)) return true
      continue
    }
    // "example.com" covers itself and its subdomains; ".example.com" and "*.example.com" only the subdomains
    if (entry.startsWith('*.')) entry = entry.slice(1)
    if (entry.startsWith('.')) {
      if (host.endsWith(entry)) return true
    } else if (host === entry || host.endsWith(`.${entry}`)) {
      return true
    }
  }
  return false
}

/** True for `localhost` and loopback addresses (a URL hostname: IPv6 in brackets or not). */
export function isLoopbackHost(hostname: string): boolean {
  const host = hostname.toLowerCase().replace(/^\[(.*)\]$/, '$1')
  return host === 'localhost' || isLoopback(host)
}

function isLoopback(host: string): boolean {
  if (isIP(host) === 4) return host.startsWith('127.')
  if (isIP(host) === 6) {
    const bytes = ipBytes(host)
    const v4mapped = bytes.slice(0, 10).every((b) => b === 0) && bytes[10] === 0xff && bytes[11] === 0xff
    return (bytes.slice(0, 15).every((b) => b === 0) && bytes[15] === 1) || (v4mapped && bytes[12] === 127)
  }
  return false
}

/** The 16 bytes of an IPv6 address, or of an IPv4 one mapped into IPv6. */
function ipBytes(ip: string): number[] {
  if (isIP(ip) === 4) return [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, ...ip.split('.').map(Number)]
  let text = ip
  const tail: number[] = []
  const v4 = /(\d+\.\d+\.\d+\.\d+)$/.exec(text)
  if (v4) {
    tail.push(...v4[1].split('.').map(Number))
    text = text.slice(0, -v4[1].length) + '0:0'
  }
  const [head, rest] = text.split('::')
  const groups = (s: string | undefined) => (s ? s.split(':').filter((g) => g !== '') : [])
  const a = groups(head)
  const b = groups(rest)
  const all = rest === undefined ? a : [...a, ...Array(8 - a.length - b.length).fill('0'), ...b]
  const bytes = all.flatMap((g) => {
    const n = parseInt(g, 16)
    return [n >> 8, n & 0xff]
  })
  if (tail.length) bytes.splice(12, 4, ...tail)
  return bytes
}

function sameIp(a: string, b: string): boolean {
  const x = ipBytes(a)
  const y = ipBytes(b)
  return x.every((v, i) => v === y[i])
}

function inCidr(ip: string, cidr: string): boolean {
  const [base, bitsText] = cidr.split('/')
  if (!isIP(base) || !/^\d+$/.test(bitsText)) return false
  // an IPv4 prefix counts in the mapped form's last 32 bits
  const bits = Number(bitsText) + (isIP(base) === 4 ? 96 : 0)
  if (bits > 128) return false
  if ((isIP(base) === 4) !== (isIP(ip) === 4) && !(isIP(ip) === 6 && isIP(base) === 4)) return false
  const x = ipBytes(base)
  const y = ipBytes(ip)
  for (let i = 0; i < 16; i++) {
    const take = Math.max(0, Math.min(8, bits - i * 8))
    if (take === 0) break
    const mask = (0xff << (8 - take)) & 0xff
    if ((x[i] & mask) !== (y[i] & mask)) return false
  }
  return true
}

/** `Proxy-Authorization` for a proxy URL with user information, else undefined. */
export function proxyAuthorization(proxy: URL): string | undefined {
  if (!proxy.username && !proxy.password) return undefined
  const user = decodeURIComponent(proxy.username)
  const password = decodeURIComponent(proxy.password)
  return `Basic ${Buffer.from(`${user}:${password}`).toString('base64')}`
}
