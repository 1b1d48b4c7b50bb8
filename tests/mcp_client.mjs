// A third-party (TypeScript SDK) MCP client for the tests: node mcp_client.mjs URL TOKEN SQL
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [url, token, sql] = process.argv.slice(2);
const headers = token ? { Authorization: `Bearer ${token}` } : {};
const transport = new StreamableHTTPClientTransport(new URL(url), { requestInit: { headers } });
const client = new Client({ name: "chia-node-probe", version: "1.0.0" });
try {
  await client.connect(transport);
  const tools = await client.listTools();
  const result = await client.callTool({ name: "query", arguments: { sql } });
  console.log(JSON.stringify({ tools: tools.tools.map((t) => t.name).sort(), text: result.content[0].text }));
  await client.close();
} catch (error) {
  console.log(JSON.stringify({ error: String(error) }));
  process.exitCode = 3;
}
