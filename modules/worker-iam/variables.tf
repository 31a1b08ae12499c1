variable "account_id" {
  type        = string
  description = "The karrots account, substituted into every worker policy."

  validation {
    condition     = can(regex("^[0-9]{12}$", var.account_id))
    error_message = "account_id must be 12 digits."
  }
}

variable "main_account_id" {
  type        = string
  description = "The account holding the primary DNS zone and karrots-root-dns."

  validation {
    condition     = can(regex("^[0-9]{12}$", var.main_account_id))
    error_message = "main_account_id must be 12 digits."
  }
}

variable "data_account_id" {
  type        = string
  description = "The data-warehouse account holding karrots-peering."

  validation {
    condition     = can(regex("^[0-9]{12}$", var.data_account_id))
    error_message = "data_account_id must be 12 digits."
  }
}

variable "user_names" {
  type        = list(string)
  description = "One karrots-worker-<name> user per person or process that runs Karrots. No access keys are created: keys would land in the state; create them by hand and keep them in a secrets manager."
  default     = []

  validation {
    condition     = alltrue([for n in var.user_names : can(regex("^[a-z0-9][a-z0-9-]{0,40}$", n))])
    error_message = "user_names must be lowercase letters, digits and '-'."
  }
}

variable "policies_dir" {
  type        = string
  description = "Folder of the IAM policy documents; default: the config repository's policies/."
  default     = null
}

variable "tags" {
  type        = map(string)
  description = "Tags merged into every resource."
  default     = {}
}
